"""load_supervised on every row format, its loss masks, bad and overlong rows; the SFT table and
the held-out split. CPU only: the tiny model's tokenizer, no Ray."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from orchestration.data import DataError, LoadReport
from orchestration.sft_data import (
    SupervisedSet,
    load_supervised,
    split_held_out,
    supervised_table,
)
from rollout import schema as S
from tests.orchestration.chat_tokens import (
    ASSISTANT,
    CHAT_TEMPLATE,
    SYSTEM,
    USER,
    E,
    assistant,
    d,
    user,
    write_jsonl,
)

pytestmark = pytest.mark.unit  # pure code in this process

CONVERSATION = [
    {"role": "system", "content": "8"},
    user("1+2="),
    assistant("3"),
    user("2+2="),
    assistant("4"),
]
# <|system|>8E <|user|>1+2=E | <|assistant|> 3E <|user|>2+2=E <|assistant|> 4E
CONVERSATION_PROMPT = [SYSTEM, *d("8"), E, USER, *d("1+2="), E, ASSISTANT]
CONVERSATION_RESPONSE = [*d("3"), E, USER, *d("2+2="), E, ASSISTANT, *d("4"), E]
CONVERSATION_MASK = [1.0, 1.0] + [0.0] * 7 + [1.0, 1.0]


# ------------------------------------------------------------------------------ row formats


def test_string_prompt_and_response(tmp_path, tokenizer):
    rows = [{"prompt": "1+2=", "response": "3"}, {"prompt": "4+4=", "response": "8"}]
    data = load_supervised(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, max_tokens=16)
    assert data.prompt_ids == [d("1+2="), d("4+4=")]
    assert data.response_ids == [[*d("3"), E], [*d("8"), E]]  # EOS appended
    assert data.loss_masks == [[1.0, 1.0], [1.0, 1.0]]
    assert data.rows == [0, 1] and len(data) == 2 and data.tokens() == 4
    assert data.report.loaded == 2 and data.report.max_prompt_tokens == 16


def test_plain_text_rows_put_every_token_after_the_first_in_the_loss(tmp_path, tokenizer):
    rows = [{"text": "1+2=3"}, {"text": "  "}]
    data = load_supervised(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, max_tokens=16)
    ids = [*d("1+2=3"), E]
    assert data.prompt_ids == [ids[:1]] and data.response_ids == [ids[1:]]
    assert data.loss_masks == [[1.0] * (len(ids) - 1)]
    assert (
        data.report.malformed == 1 and "'text' is not a non-empty string" in data.report.problems[0]
    )


def test_chat_prompt_and_response(tmp_path, chat_tokenizer):
    rows = [{"prompt": [user("1+2=")], "response": "3"}]
    data = load_supervised(write_jsonl(tmp_path / "d.jsonl", rows), chat_tokenizer, max_tokens=16)
    # <|user|>1+2=E<|assistant|> | 3E: the template's end of turn, no extra EOS
    assert data.prompt_ids == [[USER, *d("1+2="), E, ASSISTANT]]
    assert data.response_ids == [[*d("3"), E]]
    assert data.loss_masks == [[1.0, 1.0]]


def test_chat_masks_only_assistant_turns(tmp_path, chat_tokenizer):
    rows = [{"messages": CONVERSATION}]
    data = load_supervised(write_jsonl(tmp_path / "d.jsonl", rows), chat_tokenizer, max_tokens=32)
    assert data.prompt_ids == [CONVERSATION_PROMPT]
    assert data.response_ids == [CONVERSATION_RESPONSE]
    assert data.loss_masks == [CONVERSATION_MASK]
    assert data.tokens() == 4
    # The in-loss spans, decoded, are the assistant texts (and their end-of-turn token).
    response, mask = data.response_ids[0], data.loss_masks[0]
    spans, span = [], []
    for token, m in zip(response, mask, strict=True):
        if m:
            span.append(token)
        elif span:
            spans, span = [*spans, span], []
    spans.append(span)
    assert [chat_tokenizer.decode(s, skip_special_tokens=True) for s in spans] == ["3", "4"]
    assert [s[-1] for s in spans] == [E, E]
    # The user turn between them is out of the loss, its tag included.
    middle = [t for t, m in zip(response, mask, strict=True) if not m]
    assert middle == [USER, *d("2+2="), E, ASSISTANT]


def test_alpaca_with_chat_template(tmp_path, chat_tokenizer):
    rows = [{"instruction": "1+2", "input": "3", "output": "6", "history": [["1", "2"]]}]
    data = load_supervised(write_jsonl(tmp_path / "d.jsonl", rows), chat_tokenizer, max_tokens=32)
    # history turn, then "1+2\n\n3" as the user turn ("\n" tokenizes to nothing here)
    assert data.prompt_ids == [[USER, 3, E, ASSISTANT, 4, E, USER, *d("1+23"), E, ASSISTANT]]
    assert data.response_ids == [[*d("6"), E]]
    assert data.loss_masks == [[1.0, 1.0]]


def test_alpaca_without_chat_template_is_plain_text(tmp_path, tokenizer):
    rows = [
        {"instruction": "1+2", "input": "3", "output": "6", "history": [["1", "2"]]},
        {"instruction": "4+4=", "output": "8"},
    ]
    data = load_supervised(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, max_tokens=32)
    # "1\n\n2\n\n1+2\n\n3\n\n": the turns, no role tags; EOS ends the response
    assert data.prompt_ids == [d("121+23"), d("4+4=")]
    assert data.response_ids == [[*d("6"), E], [*d("8"), E]]
    assert data.loss_masks == [[1.0, 1.0], [1.0, 1.0]]
    # The blank lines, where a tokenizer keeps them: one after each turn, the last before output.
    data = load_supervised(str(tmp_path / "d.jsonl"), CharTokenizer(), max_tokens=32)
    assert data.prompt_ids[0] == [ord(c) for c in "1\n\n2\n\n1+2\n\n3\n\n"]
    assert data.response_ids[0] == [ord("6"), 0]


class CharTokenizer:
    """One token per character (its code point), EOS 0, no chat template."""

    eos_token_id, chat_template = 0, None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_builtin_addition(tokenizer):
    data = load_supervised("builtin:addition", tokenizer, max_tokens=8, addition_max_operand=2)
    assert len(data) == 9 and data.rows == list(range(9))  # 0+0= .. 2+2=
    assert data.prompt_ids[5] == d("1+2=") and data.response_ids[5] == [*d("3"), E]
    assert data.prompt_ids[8] == d("2+2=") and data.response_ids[8] == [*d("4"), E]
    assert data.tokens() == 18  # one digit and EOS each
    assert data.report.source == "builtin:addition" and data.report.rows == 9


# ------------------------------------------------------------------------------ bad rows


def test_malformed_rows_are_skipped_and_named(tmp_path, chat_tokenizer):
    lines = [
        {"prompt": "1+2=", "response": "3"},
        "{not json",
        "",
        {"prompt": "1+1="},
        {"instruction": "1+2", "output": ["3", "4"]},
        {"messages": [user("1+2=")]},
        {"prompt": "1+2=", "response": " "},
        {"foo": 1},
        {"prompt": "abc", "response": "3"},
        {"messages": [assistant("3"), user("1")]},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    data = load_supervised(path, chat_tokenizer, max_tokens=16)
    report = data.report
    assert (report.rows, report.loaded, report.malformed) == (9, 1, 8)  # the blank line is no row
    assert data.rows == [0]
    why = {
        2: "not valid JSON",
        4: "no 'response'",
        5: "preference row",
        6: "no assistant message",
        7: "'response' is empty",
        8: "no 'prompt'",
        9: "the prompt tokenizes to nothing",
        10: "nothing before its first assistant message",
    }
    assert len(report.problems) == len(why)
    for problem, (line, reason) in zip(report.problems, why.items(), strict=True):
        assert problem.startswith(f"dataset {path}, line {line}: "), problem
        assert reason in problem, problem


def test_parquet_rows_are_named_by_row(tmp_path, tokenizer):
    path = tmp_path / "d.parquet"
    rows = [{"prompt": "1+2=", "response": "3"}, {"prompt": "1+2=", "response": None}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    data = load_supervised(str(path), tokenizer, max_tokens=16)
    assert data.rows == [0]
    assert data.report.problems == [
        f"dataset {path}, row 1: no 'response' (a row with 'prompt' needs one)"
    ]


def test_strict_makes_a_malformed_row_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+2=", "response": "3"}, "[1]"])
    with pytest.raises(DataError, match=r"d\.jsonl, line 2: expected a JSON object"):
        load_supervised(path, tokenizer, max_tokens=16, strict=True)


def test_template_that_does_not_extend_the_prompt_is_a_bad_row(tmp_path, tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    # Starts with the number of messages, so a longer conversation changes the first token.
    tok.chat_template = "{{ messages | length }}" + CHAT_TEMPLATE
    rows = [
        {"prompt": "1+2=", "response": "3"},
        {"prompt": [user("1+2=")], "response": "3"},
        {"messages": [user("1+2="), assistant("3")]},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = load_supervised(path, tok, max_tokens=16)
    assert data.rows == [0] and data.report.malformed == 2
    for line, problem in zip((2, 3), data.report.problems, strict=True):
        assert problem.startswith(f"dataset {path}, line {line}: the chat template does not extend")


def test_chat_row_without_a_chat_template_is_an_error(tmp_path, tokenizer):
    for row in (
        {"messages": [user("1+2="), assistant("3")]},
        {"prompt": [user("1")], "response": "3"},
    ):
        path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+2=", "response": "3"}, row])
        with pytest.raises(DataError, match=r"line 2: .*no chat template"):
            load_supervised(path, tokenizer, max_tokens=16)


def test_no_usable_rows_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+2="}])
    with pytest.raises(
        DataError, match=r"no usable rows: 1 read, 1 malformed.*line 1: no 'response'"
    ):
        load_supervised(path, tokenizer, max_tokens=16)


# ------------------------------------------------------------------------------ overlong


OVERLONG_ROWS = [
    {"prompt": "1+2=", "response": "3"},  # 4 + 2 = 6 tokens: fits max_tokens=6
    {"prompt": "1+2=", "response": "12345"},  # 4 + 6 = 10 tokens
    {"prompt": "1+2+3+4=", "response": "1"},  # the prompt alone is 8 tokens
]


def test_overlong_skip(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", OVERLONG_ROWS)
    data = load_supervised(path, tokenizer, max_tokens=6, overlong="skip")
    assert data.rows == [0] and data.report.overlong_skipped == 2 and data.report.truncated == 0


def test_overlong_truncate_cuts_the_response_end(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", OVERLONG_ROWS)
    data = load_supervised(path, tokenizer, max_tokens=6, overlong="truncate")
    # Row 1 keeps 6 - 4 = 2 response tokens; row 2 has none left to learn, so is skipped.
    assert data.rows == [0, 1]
    assert data.response_ids[1] == d("12") and data.loss_masks[1] == [1.0, 1.0]
    assert (data.report.truncated, data.report.overlong_skipped) == (1, 1)


def test_overlong_truncate_keeps_the_chat_mask_aligned(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONVERSATION}])
    # prompt 10 tokens, so 5 of the response's 11 stay: 3 E <|user|> 1 +
    data = load_supervised(path, chat_tokenizer, max_tokens=15, overlong="truncate")
    assert data.response_ids == [[*d("3"), E, USER, *d("2+")]]
    assert data.loss_masks == [[1.0, 1.0, 0.0, 0.0, 0.0]]


def test_overlong_error_names_the_line_and_the_limit(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", OVERLONG_ROWS)
    with pytest.raises(DataError, match=r"d\.jsonl, line 2: example has 10 tokens.*max_tokens=6"):
        load_supervised(path, tokenizer, max_tokens=6, overlong="error")


# ------------------------------------------------------------------------------ table and split


def test_supervised_table_columns(tmp_path, chat_tokenizer):
    rows = [{"prompt": "1+2=", "response": "3"}, {"messages": CONVERSATION}]
    path = write_jsonl(tmp_path / "d.jsonl", ["{bad", *map(json.dumps, rows)])
    data = load_supervised(path, chat_tokenizer, max_tokens=32)
    assert data.rows == [1, 2]
    table = supervised_table(data, [1, 0], first_id=7)
    assert table.schema.types == [
        pa.int64(),
        S.TOKEN_IDS_TYPE,
        S.TOKEN_IDS_TYPE,
        S.PER_TOKEN_TYPE,
        pa.int64(),
    ]
    assert table.column_names == [
        S.PROMPT_ID,
        S.PROMPT_TOKEN_IDS,
        S.RESPONSE_TOKEN_IDS,
        S.SFT_MASK,
        "dataset_row",
    ]
    assert table[S.PROMPT_ID].to_pylist() == [7, 8]
    assert table["dataset_row"].to_pylist() == [2, 1]
    assert table[S.PROMPT_TOKEN_IDS].to_pylist() == [CONVERSATION_PROMPT, d("1+2=")]
    assert table[S.RESPONSE_TOKEN_IDS].to_pylist() == [CONVERSATION_RESPONSE, [*d("3"), E]]
    assert table[S.SFT_MASK].to_pylist() == [CONVERSATION_MASK, [1.0, 1.0]]
    lengths = [len(r) for r in table[S.RESPONSE_TOKEN_IDS].to_pylist()]
    assert [len(m) for m in table[S.SFT_MASK].to_pylist()] == lengths == [11, 2]


def examples(n: int) -> SupervisedSet:
    return SupervisedSet([[1]] * n, [[2]] * n, [[1.0]] * n, list(range(n)), LoadReport())


def test_split_held_out_is_seeded_and_disjoint():
    train, held = split_held_out(examples(10), 0.2, seed=3)
    assert len(held) == 2 and len(train) == 8
    assert sorted(train + held) == list(range(10))
    assert split_held_out(examples(10), 0.2, seed=3) == (train, held)
    others = {tuple(split_held_out(examples(10), 0.2, seed=s)[1]) for s in range(10)}
    assert len(others) > 1  # the seed chooses


def test_split_held_out_sizes():
    assert len(split_held_out(examples(10), 0.01, seed=0)[1]) == 1  # at least one
    assert split_held_out(examples(10), 0.0, seed=0) == (list(range(10)), [])
    assert split_held_out(examples(1), 0.5, seed=0) == ([0], [])  # never all
    assert len(split_held_out(examples(2), 0.9, seed=0)[0]) == 1
    with pytest.raises(ValueError, match="share"):
        split_held_out(examples(10), 1.0, seed=0)


def test_an_episode_row_masks_its_observations(tmp_path, tokenizer):
    # model turn "1+2", observation "3", model turn "3": each tokenized on its own, the
    # observation out of the loss, EOS after the last model turn
    turns = [
        {"role": "model", "content": "1+2"},
        {"role": "observation", "content": "=3"},
        {"role": "model", "content": "3"},
    ]
    rows = [
        {"prompt": "1+2=", "turns": turns},
        {"prompt": "1+2=", "turns": turns[:2]},  # ends on an observation: malformed
        {"prompt": "1+2=", "turns": [{"role": "tool", "content": "3"}]},
    ]
    data = load_supervised(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, max_tokens=16)
    assert data.prompt_ids == [d("1+2=")]
    assert data.response_ids == [[*d("1+2"), *d("=3"), *d("3"), E]]
    assert data.loss_masks == [[1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]]
    assert data.report.malformed == 2
    assert any("alternate" in p for p in data.report.problems)


def test_calculator_demonstrations_hold_out_the_rl_prompts():
    from orchestration.data import calculator_examples
    from orchestration.sft_data import calculator_demonstrations

    rl = {p for p, _ in calculator_examples(4)}
    demos = calculator_demonstrations(4)
    large = [r for r in demos if len(r["prompt"]) > 4]
    assert len(large) == 200 and not {r["prompt"] for r in large} & rl
    calls = [r for r in large if "turns" in r]
    assert 0.3 < len(calls) / len(large) < 0.7  # about half call the calculator
    for r in calls:
        a, b = r["prompt"][:-1].split("+")
        model, observation, answer = (t["content"] for t in r["turns"])
        assert model == f"<calc>{a}+{b}</calc>" and answer == str(int(a) + int(b))
        assert observation == f"<result>{answer}</result>"
    small = [r for r in demos if len(r["prompt"]) <= 4]
    assert len(small) == 25 and all("turns" not in r for r in small)
