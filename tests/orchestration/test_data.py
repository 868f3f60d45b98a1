import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from orchestration.data import DataError, PromptSampler, addition_examples, load_prompts


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
        ([{"prompt": "1+2="}, {"label": 3}], "row 1: no 'prompt' (every row needs a prompt)"),
        ([{"prompt": "  "}], "row 0: no 'prompt'"),
        ([{"prompt": 5}], "row 0: 'prompt' is a int; expected a string or a list of chat"),
        ([{"prompt": "1+2=1+2=1+2=1+2="}], "prompt has 16 tokens, more than data.max_prompt"),
        ([], "no rows"),
    ],
)
def test_bad_rows_are_named(tmp_path, tokenizer, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_prompts(path, tokenizer, max_prompt_tokens=8)
    assert message in str(err.value) and path in str(err.value)


def test_invalid_json_line_is_named(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "1+2="}\n{oops\n')
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        load_prompts(str(path), tokenizer, max_prompt_tokens=8)


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
