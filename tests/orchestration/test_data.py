import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from orchestration.data import DataError, PromptSet, addition_examples, load_prompts, read_rows
from orchestration.sampler import PromptSampler

pytestmark = pytest.mark.unit  # pure code in this process


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def test_builtin_addition(tokenizer):
    assert addition_examples(1) == [("0+0=", "0"), ("0+1=", "1"), ("1+0=", "1"), ("1+1=", "2")]
    prompts = load_prompts(
        "builtin:addition", tokenizer, max_prompt_tokens=8, addition_max_operand=4
    )
    assert len(prompts) == 25 and prompts.labels[-1] == "8"
    assert tokenizer.decode(prompts.token_ids[-1]) == "4+4="
    assert prompts.report.summary() == (
        "loaded 25 of 25 rows from builtin:addition; skipped 0 malformed, 0 over 8 tokens; "
        "truncated 0"
    )


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_jsonl_and_parquet_rows(tmp_path, tokenizer):
    rows = [{"prompt": "1+2=", "label": 3}, {"prompt": "2+2="}]
    for source in (
        write_jsonl(tmp_path / "p.jsonl", rows),
        str(tmp_path / "p.parquet"),
    ):
        if source.endswith(".parquet"):
            pq.write_table(pa.Table.from_pylist(rows), source)
        prompts = load_prompts(source, tokenizer, max_prompt_tokens=8)
        assert prompts.labels == ["3", None]
        assert tokenizer.decode(prompts.token_ids[0]) == "1+2="


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            [{"prompt": "1+2="}, {"label": 3}],
            "line 2: no 'prompt' (every row needs a prompt, 'messages' or 'instruction')",
        ),
        ([{"prompt": "  "}], "line 1: 'prompt' is empty"),
        ([{"prompt": 5}], "line 1: 'prompt' is a int; expected a string or a list of chat"),
        ([], "no rows"),
    ],
)
def test_bad_rows_are_named_in_strict_mode(tmp_path, tokenizer, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_prompts(path, tokenizer, max_prompt_tokens=8, strict=True)
    assert message in str(err.value) and path in str(err.value)


def test_overlong_prompt_is_named_when_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "1+2="}, {"prompt": "1+2=" * 4}])
    with pytest.raises(DataError) as err:
        load_prompts(path, tokenizer, max_prompt_tokens=8, overlong="error")
    assert f"{path}, line 2: prompt has 16 tokens, more than data.max_prompt_tokens=8" in str(
        err.value
    )


def test_invalid_json_line_is_named(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "1+2="}\n{oops\n')
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        load_prompts(str(path), tokenizer, max_prompt_tokens=8, strict=True)
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        read_rows(path)  # read_rows stays strict


def test_sampler_ids_are_unique_and_passes_cover_every_prompt(tokenizer):
    prompts = load_prompts(
        "builtin:addition", tokenizer, max_prompt_tokens=8, addition_max_operand=1
    )
    sampler = PromptSampler(prompts, seed=0)
    first, second = sampler.next_batch(3), sampler.next_batch(3)
    ids = first["prompt_id"].to_pylist() + second["prompt_id"].to_pylist()
    assert ids == list(range(6))  # unique even though 6 draws > 4 prompts
    assert sorted(first["dataset_row"].to_pylist() + second["dataset_row"].to_pylist()[:1]) == [
        0,
        1,
        2,
        3,
    ]
    assert sampler.epoch == 1


# ------------------------------------------------------------------------------ sampler state


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return load_prompts("builtin:addition", tokenizer, max_prompt_tokens=8, addition_max_operand=4)


def draws(sampler, batches, size):
    return [sampler.next_batch(size)["dataset_row"].to_pylist() for _ in range(batches)]


def test_sampler_order_depends_on_seed_only(prompts):
    assert draws(PromptSampler(prompts, 3), 4, 10) == draws(PromptSampler(prompts, 3), 4, 10)
    assert draws(PromptSampler(prompts, 3), 1, 25) != draws(PromptSampler(prompts, 4), 1, 25)


def test_each_epoch_is_a_new_permutation(prompts):
    sampler = PromptSampler(prompts, 0)
    first, second = draws(sampler, 2, 25)
    assert sorted(first) == sorted(second) == list(range(25))
    assert first != second
    assert sampler.epoch == 2 and sampler.position == 0


def test_unshuffled_sampler_walks_the_dataset_in_order(prompts):
    sampler = PromptSampler(prompts, 0, shuffle=False)
    assert draws(sampler, 2, 15) == [list(range(15)), list(range(15, 25)) + list(range(5))]
    assert (sampler.epoch, sampler.position, sampler.progress) == (1, 5, 1.2)


def test_state_dict_round_trip_across_an_epoch_boundary(prompts):
    original = PromptSampler(prompts, 7)
    draws(original, 3, 7)  # 21 of 25 drawn: the next batch crosses into epoch 1
    state = original.state_dict()
    assert state == {"epoch": 0, "position": 21, "drawn": 21, "seed": 7}
    assert original.progress == 21 / 25
    restored = PromptSampler(prompts, 7)
    restored.load_state_dict(state)
    for _ in range(4):  # 28 more draws: epoch 1 and into epoch 2
        assert original.next_batch(7).equals(restored.next_batch(7))
    assert restored.state_dict() == {"epoch": 1, "position": 24, "drawn": 49, "seed": 7}


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"epoch": 0, "position": 3, "drawn": 3, "seed": 8}, "seed 8, this sampler 7"),
        ({"epoch": 0, "position": 25, "drawn": 25, "seed": 7}, "position 25 is outside 0..24"),
        ({"epoch": 0, "position": -1, "drawn": 0, "seed": 7}, "position -1 is outside"),
        ({"epoch": 1, "position": 3, "drawn": 3, "seed": 7}, "does not fit a prompt set of 25"),
        ({"epoch": 0, "position": 3, "seed": 7}, "lacks ['drawn']"),
    ],
)
def test_bad_sampler_state_is_refused(prompts, state, message):
    sampler = PromptSampler(prompts, 7)
    with pytest.raises(ValueError) as err:
        sampler.load_state_dict(state)
    assert message in str(err.value)
    assert sampler.state_dict() == {"epoch": 0, "position": 0, "drawn": 0, "seed": 7}


def test_empty_prompt_set_cannot_be_sampled():
    with pytest.raises(ValueError, match="at least one prompt"):
        PromptSampler(PromptSet(token_ids=[], labels=[]), 0)


def test_dataset_responses_are_tokenized_as_sft_responses(tmp_path, tokenizer):
    from tests.orchestration.chat_tokens import E, d

    rows = [
        {"prompt": "1+2=", "label": 3, "ours": "3", "theirs": ["4", "33333"]},
        {"prompt": "2+2="},  # no responses: none, not malformed
        {"prompt": "2+1=", "ours": 3},  # not a string: malformed
        {"prompt": "1+1=", "theirs": ["2", " "]},  # an empty one: malformed
    ]
    source = write_jsonl(tmp_path / "c.jsonl", rows)
    prompts = load_prompts(
        source,
        tokenizer,
        max_prompt_tokens=8,
        responses_keys=["ours", "theirs"],
        max_response_tokens=3,
    )
    assert prompts.responses == [[d("3") + [E], d("4") + [E]], []]  # "33333"+EOS is over 3
    report = prompts.report
    assert (report.malformed, report.candidates, report.candidates_overlong) == (2, 2, 1)
    assert "'ours' is not a string or a list of strings" in report.problems[0]
    assert "'theirs' holds an empty response" in report.problems[1]
    assert report.metrics()["data/candidates_overlong"] == 1.0
    plain = load_prompts(source, tokenizer, max_prompt_tokens=8)
    assert plain.responses == [] and "data/candidates" not in plain.report.metrics()


def test_dataset_responses_of_a_chat_prompt_are_the_assistant_turn(tmp_path, chat_tokenizer):
    from tests.orchestration.chat_tokens import ASSISTANT, USER, E, d, user

    source = write_jsonl(tmp_path / "c.jsonl", [{"prompt": [user("1+2=")], "answers": ["3"]}])
    prompts = load_prompts(source, chat_tokenizer, max_prompt_tokens=16, responses_keys=["answers"])
    assert prompts.token_ids == [[USER, *d("1+2="), E, ASSISTANT]]
    assert prompts.responses == [[d("3") + [E]]]  # the template ends a turn with EOS
