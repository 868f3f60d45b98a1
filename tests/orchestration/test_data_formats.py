"""load_prompts on every file format and row format users bring, and what it does with bad rows."""

import json

import datasets
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from orchestration.data import DataError, PromptSet, load_prompts

pytestmark = pytest.mark.unit  # pure code in this process

# The tiny tokenizer knows only digits, '+', '=' and its EOS, so the test template marks roles
# with '+' (user) and '=' (others), and writes newlines as '=' so that a separator shows.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '+' if m['role'] == 'user' else '=' }}"
    "{{ m['content'] | replace('\\n', '=') }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}={% endif %}"
)
EOS = "<|endoftext|>"
ROWS = [{"prompt": "1+2=", "label": "3"}, {"prompt": "2+2=", "label": None}, {"prompt": "4+4="}]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture
def chat_tokenizer(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def write_arrow(path, rows, stream):
    table = pa.Table.from_pylist(rows)
    new = pa.ipc.new_stream if stream else pa.ipc.new_file
    with pa.OSFile(str(path), "wb") as sink, new(sink, table.schema) as writer:
        writer.write_table(table)
    return str(path)


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


# ------------------------------------------------------------------------------ file formats


def test_every_format_loads_the_same_prompts(tmp_path, tokenizer):
    table = pa.Table.from_pylist(ROWS)
    feather.write_feather(table, tmp_path / "p.feather")
    datasets.Dataset.from_list(ROWS).save_to_disk(tmp_path / "saved")
    # The train split holds other rows, so loading the wrong split would show.
    other = datasets.Dataset.from_list([{"prompt": "0+0=", "label": "0"}] * 3)
    datasets.DatasetDict({"train": other, "test": datasets.Dataset.from_list(ROWS)}).save_to_disk(
        tmp_path / "saved_dict"
    )
    sources = {
        "jsonl": (write_jsonl(tmp_path / "p.jsonl", ROWS), "train"),
        "json": (write_jsonl(tmp_path / "p.json", ROWS), "train"),
        "parquet": (write_parquet(tmp_path / "p.parquet", ROWS), "train"),
        "arrow file": (write_arrow(tmp_path / "p.arrow", ROWS, stream=False), "train"),
        "arrow stream": (write_arrow(tmp_path / "p.ipc", ROWS, stream=True), "train"),
        "feather": (str(tmp_path / "p.feather"), "train"),
        "datasets": (str(tmp_path / "saved"), "train"),
        "datasets dict": (str(tmp_path / "saved_dict"), "test"),
    }
    expected = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in ROWS]
    assert len(set(map(tuple, expected))) == 3
    for name, (source, split) in sources.items():
        prompts = load_prompts(source, tokenizer, max_prompt_tokens=8, split=split)
        assert prompts.token_ids == expected, name
        assert prompts.labels == ["3", None, None], name
        assert prompts.rows == [0, 1, 2] and prompts.report.loaded == 3, name


def test_missing_split_lists_the_splits(tmp_path, tokenizer):
    rows = datasets.Dataset.from_list(ROWS)
    datasets.DatasetDict({"train": rows, "test": rows}).save_to_disk(tmp_path / "d")
    with pytest.raises(DataError, match=r"no split 'dev'; it has test, train"):
        load_prompts(str(tmp_path / "d"), tokenizer, max_prompt_tokens=8, split="dev")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("p.csv", "prompt\n1+2=\n", "unsupported format .csv; supported formats: .jsonl"),
        ("absent.jsonl", None, "no such file or directory; supported formats"),
        ("p.json", '[{"prompt": "1+2="}]', "holds a JSON array; write one JSON object per line"),
        ("p.arrow", "not arrow", "cannot be read as .arrow"),
        ("p.jsonl", b"\xff\xfe", "not UTF-8 text"),
        ("plain_dir", "", "not one written by datasets' save_to_disk"),
    ],
)
def test_unusable_sources_are_named(tmp_path, tokenizer, name, content, message):
    path = tmp_path / name
    if name == "plain_dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(DataError) as err:
        load_prompts(str(path), tokenizer, max_prompt_tokens=8)
    assert message in str(err.value) and str(path) in str(err.value)


# ------------------------------------------------------------------------------ malformed rows


def write_messy_jsonl(tmp_path):
    path = tmp_path / "messy.jsonl"
    lines = ['{"prompt": "1+2="}', "", "{oops", "[1]", '{"label": "x"}', '{"prompt": "2+2="}']
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_malformed_jsonl_rows_are_skipped_and_named_by_line(tmp_path, tokenizer):
    path = write_messy_jsonl(tmp_path)
    prompts = load_prompts(path, tokenizer, max_prompt_tokens=8)
    assert [tokenizer.decode(ids) for ids in prompts.token_ids] == ["1+2=", "2+2="]
    assert prompts.rows == [0, 4]  # rows are counted over non-blank lines
    report = prompts.report
    assert (report.rows, report.loaded, report.malformed) == (5, 2, 3)
    assert report.problems[0].startswith(f"dataset {path}, line 3: not valid JSON (")
    assert report.problems[1:] == [
        f"dataset {path}, line 4: expected a JSON object, got a list",
        f"dataset {path}, line 5: no 'prompt' (every row needs a prompt, 'messages' or "
        "'instruction')",
    ]


def test_strict_mode_raises_at_the_first_malformed_row(tmp_path, tokenizer):
    path = write_messy_jsonl(tmp_path)
    with pytest.raises(DataError, match=r"messy.jsonl, line 3: not valid JSON"):
        load_prompts(path, tokenizer, max_prompt_tokens=8, strict=True)


def test_malformed_parquet_row_is_named_by_row(tmp_path, tokenizer):
    path = write_parquet(tmp_path / "p.parquet", [{"prompt": "1+2="}, {"prompt": ""}, ROWS[1]])
    prompts = load_prompts(path, tokenizer, max_prompt_tokens=8)
    assert prompts.rows == [0, 2]
    assert prompts.report.problems == [f"dataset {path}, row 1: 'prompt' is empty"]


def test_dataset_without_rows_or_usable_rows_is_an_error(tmp_path, tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: no rows"):
        load_prompts(str(empty), tokenizer, max_prompt_tokens=8)
    path = write_jsonl(tmp_path / "bad.jsonl", [{"label": "1"}, {"prompt": 3}, {"prompt": "1+2="}])
    with pytest.raises(DataError) as err:
        load_prompts(path, tokenizer, max_prompt_tokens=2)
    message = str(err.value)
    assert "no usable rows: 3 read, 2 malformed, 1 over data.max_prompt_tokens=2" in message
    assert "first problems: " in message and "line 2: 'prompt' is a int" in message


# ------------------------------------------------------------------------------ overlong prompts


def test_overlong_prompts_are_skipped_truncated_or_an_error(tmp_path, tokenizer):
    long = "0+1=2+3=4+4="  # 12 tokens, one per character
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+2="}, {"prompt": long, "label": "8"}])
    skipped = load_prompts(path, tokenizer, max_prompt_tokens=8, strict=True)
    assert len(skipped) == 1 and skipped.report.overlong_skipped == 1
    assert skipped.report.malformed == 0  # overlong is not malformed, even when strict

    cut = load_prompts(path, tokenizer, max_prompt_tokens=8, overlong="truncate")
    assert cut.report.truncated == 1 and cut.labels == [None, "8"]
    assert tokenizer.decode(cut.token_ids[1]) == "2+3=4+4="  # the tail is kept

    with pytest.raises(DataError, match="line 2: prompt has 12 tokens, more than data.max_prompt"):
        load_prompts(path, tokenizer, max_prompt_tokens=8, overlong="error")


def test_report_summary_and_metrics(tmp_path, tokenizer):
    rows = [{"prompt": "1+2="}, {"prompt": 1}, {"prompt": "1+2=" * 3}, {"prompt": "2+2="}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    report = load_prompts(path, tokenizer, max_prompt_tokens=8).report
    assert report.summary() == (
        f"loaded 2 of 4 rows from {path}; skipped 1 malformed, 1 over 8 tokens; truncated 0"
    )
    assert report.metrics() == {
        "data/rows": 4.0,
        "data/loaded": 2.0,
        "data/malformed": 1.0,
        "data/overlong_skipped": 1.0,
        "data/truncated": 0.0,
    }


def test_prompt_set_built_by_hand_has_an_empty_report_and_identity_rows():
    prompts = PromptSet(token_ids=[[1], [2]], labels=[None, "x"])
    assert prompts.report.rows == 0 and prompts.report.problems == []
    assert [prompts.source_row(i) for i in range(2)] == [0, 1]


# ------------------------------------------------------------------------------ chat and SFT rows


def rendered(tok, messages):
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_chat_prompts_are_rendered_with_the_template(tmp_path, chat_tokenizer):
    messages = [{"role": "user", "content": "1+2"}]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": messages, "label": 3}])
    prompts = load_prompts(path, chat_tokenizer, max_prompt_tokens=16)
    assert chat_tokenizer.decode(prompts.token_ids[0]) == f"+1+2{EOS}="
    assert rendered(chat_tokenizer, messages) == f"+1+2{EOS}="
    assert prompts.labels == ["3"]


def test_messages_rows_prompt_with_the_conversation_before_the_last_answer(
    tmp_path, chat_tokenizer
):
    user, assistant = "user", "assistant"
    conversation = [
        {"role": user, "content": "1+2"},
        {"role": assistant, "content": "3"},
        {"role": user, "content": "2+2"},
        {"role": assistant, "content": "4"},
    ]
    rows = [
        {"messages": conversation},
        {"messages": conversation[:3]},  # ends with the user: all of it, no label
        {"messages": conversation, "label": "four"},
    ]
    prompts = load_prompts(
        write_jsonl(tmp_path / "m.jsonl", rows), chat_tokenizer, max_prompt_tokens=32
    )
    texts = [chat_tokenizer.decode(ids) for ids in prompts.token_ids]
    expected = f"+1+2{EOS}=3{EOS}+2+2{EOS}="
    assert texts == [expected] * 3
    assert texts[0] == rendered(chat_tokenizer, conversation[:3])
    assert prompts.labels == ["4", None, "four"]


def test_alpaca_rows_prompt_with_history_then_instruction_and_input(tmp_path, chat_tokenizer):
    rows = [
        {"instruction": "1+2", "input": "3", "output": "4", "history": [["1", "2"]]},
        {"instruction": "4+4", "input": "", "output": "8"},
        {"instruction": "4+4", "output": "8", "label": "eight"},
    ]
    prompts = load_prompts(
        write_jsonl(tmp_path / "a.jsonl", rows), chat_tokenizer, max_prompt_tokens=32
    )
    first = [
        {"role": "user", "content": "1"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "1+2\n\n3"},
    ]
    texts = [chat_tokenizer.decode(ids) for ids in prompts.token_ids]
    assert texts[0] == rendered(chat_tokenizer, first) == f"+1{EOS}=2{EOS}+1+2==3{EOS}="
    assert texts[1] == texts[2] == f"+4+4{EOS}="  # an empty input adds no separator
    assert prompts.labels == ["4", "8", "eight"]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"messages": "1+2"}, "'messages' is not a non-empty list of chat messages"),
        ({"messages": []}, "'messages' is not a non-empty list of chat messages"),
        ({"messages": [{"role": "user"}]}, "'messages' item 0 is not a chat message"),
        ({"prompt": [{"role": "user", "content": 1}]}, "'prompt' item 0 is not a chat message"),
        (
            {"messages": [{"role": "assistant", "content": "3"}]},
            "'messages' has nothing before its last assistant message",
        ),
        ({"instruction": 3}, "'instruction' is not a non-empty string"),
        ({"instruction": "1", "input": 2}, "'input' is a int; expected a string"),
        ({"instruction": "1", "history": [["1"]]}, "'history' is not a list of [user, assistant]"),
    ],
)
def test_bad_chat_and_sft_rows_are_malformed(tmp_path, chat_tokenizer, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+2="}, row])
    prompts = load_prompts(path, chat_tokenizer, max_prompt_tokens=32)
    assert len(prompts) == 1
    (problem,) = prompts.report.problems
    assert problem.startswith(f"dataset {path}, line 2: {message}")


def test_chat_rows_need_a_chat_template_even_when_not_strict(tmp_path, tokenizer):
    assert tokenizer.chat_template is None
    for row in ({"prompt": [{"role": "user", "content": "1+2"}]}, {"instruction": "1+2"}):
        path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "1+2="}, row])
        with pytest.raises(DataError) as err:
            load_prompts(path, tokenizer, max_prompt_tokens=8)
        assert f"{path}, line 2:" in str(err.value)
        assert "the tokenizer has no chat template; give string prompts" in str(err.value)
