"""Prompt datasets: the built-in task and user files, tokenized and checked before any actor starts.

Sources: ``builtin:addition``; JSON lines (``.jsonl``, or ``.json`` holding JSON lines); Parquet;
Arrow IPC, file or stream (``.arrow``, ``.feather``, ``.ipc``); a directory written by the
``datasets`` library's ``save_to_disk`` (for a ``DatasetDict``, one split of it).

A row is read as the first of these that fits:

1. a prompt under ``prompt_key``: a string, or a list of chat messages ``[{"role", "content"}]``;
   the label is under ``label_key`` (optional);
2. chat SFT, ``{"messages": [...]}``: the prompt is the conversation before its last assistant
   message, whose content is the label;
3. Alpaca SFT, ``{"instruction", "input", "output", "history": [[user, assistant], ...]}``: the
   prompt is the history, then the instruction (and input) as a user message; the label is
   ``output``.

``label_key``, where a row has it, is the label in every case. Chat prompts are rendered with the
tokenizer's chat template and a generation prompt. ``responses_keys`` (RRHF's dataset
candidates) name fields holding responses to the prompt (a string or a list of strings: the
dataset's answer, other models' answers); each is tokenized as the SFT stage tokenizes a response
(plain text and EOS, or the chat template's assistant turn). A row that cannot be used is
skipped, counted and described with its file and line (JSON lines) or row (the others); with
``strict=True`` the first one is an error. The ``LoadReport`` of the ``PromptSet`` says what
was loaded and skipped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import pyarrow as pa

from orchestration.tasks import (  # noqa: F401 - the built-in tasks, importable from here too
    BUILTIN_TASKS,
    addition_corpus,
    addition_examples,
    builtin_corpus,
    calculator_examples,
    guess_examples,
)


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file and row."""


SUPPORTED_FORMATS = (
    ".jsonl or .json (JSON lines), .parquet, .arrow / .feather / .ipc (Arrow IPC file or stream), "
    "or a directory written by datasets' save_to_disk"
)
_ARROW_SUFFIXES = (".arrow", ".feather", ".ipc")
_MAX_PROBLEMS = 100  # messages kept in a LoadReport; the counts stay exact
Overlong = Literal["skip", "truncate", "error"]


# ------------------------------------------------------------------------------ files


class _Record(NamedTuple):
    """One row of a source: where it is (``line 7``, ``row 3``), the row, or why there is none."""

    location: str
    row: dict | None
    problem: str | None = None


def _json_lines(path: Path) -> list[_Record]:
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise DataError(f"dataset {path}: not UTF-8 text, so not JSON lines ({e})") from None
    if text.lstrip().startswith("["):
        raise DataError(
            f"dataset {path}: holds a JSON array; write one JSON object per line (JSON lines)"
        )
    records = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        location = f"line {i + 1}"  # the file's own line number, blank lines included
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            records.append(_Record(location, None, f"not valid JSON ({e})"))
            continue
        if isinstance(row, dict):
            records.append(_Record(location, row))
        else:
            records.append(
                _Record(location, None, f"expected a JSON object, got a {type(row).__name__}")
            )
    return records


def _read_table(path: Path) -> pa.Table:
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        with pa.OSFile(str(path)) as file:
            try:
                return pa.ipc.open_file(file).read_all()
            except pa.ArrowInvalid:
                # No IPC file footer: try the stream format (what datasets' cache files use).
                file.seek(0)
                return pa.ipc.open_stream(file).read_all()
    except pa.ArrowInvalid as e:
        raise DataError(f"dataset {path}: cannot be read as {path.suffix} ({e})") from None


def _saved_dataset(path: Path, split: str) -> tuple[str, pa.Table]:
    markers = ("dataset_dict.json", "dataset_info.json", "state.json")
    if not any((path / m).is_file() for m in markers):
        raise DataError(
            f"dataset {path}: a directory without {', '.join(markers)}, so not one written by "
            f"datasets' save_to_disk; supported formats: {SUPPORTED_FORMATS}"
        )
    import datasets  # slow to import, and only this format needs it

    loaded, where = datasets.load_from_disk(str(path)), f"dataset {path}"
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"{where}: no split {split!r}; it has {', '.join(sorted(loaded))}; choose one"
            )
        loaded, where = loaded[split], f"dataset {path} (split {split})"
    return where, loaded.with_format("arrow")[:]


def _open_source(path: Path, split: str) -> tuple[str, list[_Record]]:
    """The name messages give ``path``, and its rows; problems of the whole file raise here."""
    where, suffix = f"dataset {path}", path.suffix.lower()
    if path.is_dir():
        where, table = _saved_dataset(path, split)
    elif not path.exists():
        raise DataError(
            f"{where}: no such file or directory; supported formats: {SUPPORTED_FORMATS}"
        )
    elif suffix in (".jsonl", ".json"):
        return where, _json_lines(path)
    elif suffix in (".parquet", *_ARROW_SUFFIXES):
        table = _read_table(path)
    else:
        raise DataError(
            f"{where}: unsupported format {suffix or 'without a suffix'}; "
            f"supported formats: {SUPPORTED_FORMATS}"
        )
    return where, [_Record(f"row {i}", row) for i, row in enumerate(table.to_pylist())]


def read_rows(path: Path, *, split: str = "train") -> list[dict]:
    """Every row of a dataset file or ``datasets`` directory, in order, as dicts.

    Strict: a JSON line that is not a JSON object is an error.

    Raises:
        DataError: a missing or unsupported source, or a bad JSON line (naming the line).
    """
    where, records = _open_source(Path(path), split)
    for record in records:
        if record.problem is not None:
            raise DataError(f"{where}, {record.location}: {record.problem}")
    return [record.row for record in records]


# ------------------------------------------------------------------------------ prompts


@dataclass
class LoadReport:
    """What ``load_prompts`` made of a source: rows read, loaded and skipped, and why.

    ``problems`` holds the message of every malformed row, the first ``100`` of them; the counts
    are exact.
    """

    source: str = ""
    max_prompt_tokens: int = 0
    rows: int = 0
    loaded: int = 0
    malformed: int = 0
    overlong_skipped: int = 0
    truncated: int = 0
    candidates: int | None = None  # dataset responses loaded; None: none were asked for
    candidates_overlong: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the log."""
        line = (
            f"loaded {self.loaded} of {self.rows} rows from {self.source}; skipped "
            f"{self.malformed} malformed, {self.overlong_skipped} over {self.max_prompt_tokens} "
            f"tokens; truncated {self.truncated}"
        )
        if self.candidates is not None:
            line += (
                f"; {self.candidates} dataset responses, {self.candidates_overlong} over the "
                "response limit left out"
            )
        return line

    def metrics(self) -> dict[str, float]:
        """The counts as ``data/`` metrics."""
        counts = ("rows", "loaded", "malformed", "overlong_skipped", "truncated")
        if self.candidates is not None:
            counts += ("candidates", "candidates_overlong")
        return {f"data/{name}": float(getattr(self, name)) for name in counts}


@dataclass(frozen=True)
class PromptSet:
    """Tokenized prompts with their labels (None where a row has none).

    ``rows[i]`` is the source row prompt ``i`` came from (its index among the source's rows; for
    JSON lines, among the non-blank lines); empty means prompt ``i`` is row ``i``.
    ``responses[i]`` are prompt ``i``'s dataset responses, tokenized (empty: none were asked
    for).
    """

    token_ids: list[list[int]]
    labels: list[str | None]
    rows: list[int] = field(default_factory=list)
    responses: list[list[list[int]]] = field(default_factory=list)
    report: LoadReport = field(default_factory=LoadReport)

    def __len__(self) -> int:
        return len(self.token_ids)

    def source_row(self, index: int) -> int:
        """The source row of prompt ``index``."""
        return self.rows[index] if self.rows else index


class _BadRow(Exception):
    """A malformed row; the message says why, without the location."""


def skip_malformed(report, at: str, bad: Exception, strict: bool) -> None:
    """A malformed row at ``at``: with ``strict`` an error naming it, else counted in
    ``report.malformed`` and its message kept (the first ``_MAX_PROBLEMS``) in
    ``report.problems``. Every loader's reports (prompts, supervised, preferences) have both."""
    if strict:
        raise DataError(f"{at}: {bad}") from None
    report.malformed += 1
    if len(report.problems) < _MAX_PROBLEMS:
        report.problems.append(f"{at}: {bad}")


def _messages(value, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _BadRow(f"'{key}' is not a non-empty list of chat messages")
    for i, message in enumerate(value):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise _BadRow(
                f"'{key}' item {i} is not a chat message with string role and content: "
                f"{message!r:.80}"
            )
    return value


def _alpaca(row: dict) -> list[dict]:
    instruction, text, history = row["instruction"], row.get("input"), row.get("history") or []
    if not isinstance(instruction, str) or not instruction.strip():
        raise _BadRow("'instruction' is not a non-empty string")
    if text is not None and not isinstance(text, str):
        raise _BadRow(f"'input' is a {type(text).__name__}; expected a string")
    if not isinstance(history, list) or not all(
        isinstance(turn, list | tuple) and len(turn) == 2 and all(isinstance(s, str) for s in turn)
        for turn in history
    ):
        raise _BadRow("'history' is not a list of [user, assistant] string pairs")
    messages = []
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    content = instruction + ("\n\n" + text if text else "")
    return [*messages, {"role": "user", "content": content}]


def _prompt_and_label(
    row: dict, prompt_key: str, label_key: str
) -> tuple[str | list[dict], object]:
    """The prompt (a string or chat messages) of a row and its label (None if it has none)."""
    label = row.get(label_key)
    prompt = row.get(prompt_key)
    if prompt is not None:
        if isinstance(prompt, str):
            if not prompt.strip():
                raise _BadRow(f"'{prompt_key}' is empty")
            return prompt, label
        if isinstance(prompt, list):
            return _messages(prompt, prompt_key), label
        raise _BadRow(
            f"'{prompt_key}' is a {type(prompt).__name__}; "
            "expected a string or a list of chat messages"
        )
    if row.get("messages") is not None:
        messages = _messages(row["messages"], "messages")
        if messages[-1]["role"] != "assistant":
            return messages, label
        if len(messages) == 1:
            raise _BadRow("'messages' has nothing before its last assistant message")
        return messages[:-1], messages[-1]["content"] if label is None else label
    if row.get("instruction") is not None:
        return _alpaca(row), row.get("output") if label is None else label
    raise _BadRow(f"no '{prompt_key}' (every row needs a prompt, 'messages' or 'instruction')")


def _token_ids(prompt: str | list[dict], tokenizer, at: str) -> list[int]:
    if isinstance(prompt, str):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    else:
        if getattr(tokenizer, "chat_template", None) is None:
            # Not the row's fault: every chat row would fail the same way.
            raise DataError(
                f"{at}: the prompt is a chat conversation, but the tokenizer has no chat "
                "template; give string prompts, or a tokenizer that has one"
            )
        from jinja2 import TemplateError

        try:
            out = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        except TemplateError as e:
            raise _BadRow(f"the chat template rejects the messages ({e})") from None
        # transformers 5 returns a BatchEncoding; older versions the ids.
        ids = out["input_ids"] if isinstance(out, Mapping) else out
    if not ids:
        raise _BadRow("the prompt tokenizes to nothing")
    return [int(t) for t in ids]


def _responses(row: dict, keys: Sequence[str]) -> list[str]:
    """The response texts under ``keys`` (each a string or a list of strings; absent: none)."""
    texts = []
    for key in keys:
        value = row.get(key)
        if value is None:
            continue
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise _BadRow(f"'{key}' is not a string or a list of strings: {value!r:.80}")
        for v in values:
            if not v.strip():
                raise _BadRow(f"'{key}' holds an empty response")
        texts += values
    return texts


def _source_records(
    source: str, addition_max_operand: int, split: str
) -> tuple[str, list[_Record]]:
    if source in BUILTIN_TASKS:
        pairs = BUILTIN_TASKS[source](addition_max_operand)
        rows = [{"prompt": p, "label": a} for p, a in pairs]
        return source, [_Record(f"row {i}", row) for i, row in enumerate(rows)]
    if source.startswith("builtin:"):
        raise DataError(
            f"unknown built-in dataset {source!r}; the built-in ones are "
            + ", ".join(BUILTIN_TASKS)
        )
    return _open_source(Path(source), split)


def load_prompts(
    source: str,
    tokenizer,
    *,
    prompt_key: str = "prompt",
    label_key: str = "label",
    max_prompt_tokens: int,
    addition_max_operand: int = 9,
    overlong: Overlong = "skip",
    strict: bool = False,
    split: str = "train",
    responses_keys: Sequence[str] = (),
    max_response_tokens: int | None = None,
) -> PromptSet:
    """Read and tokenize every prompt of ``source`` (see the module docstring for formats).

    Args:
        source: ``builtin:addition``, a file path, or a ``datasets`` directory.
        tokenizer: a Hugging Face tokenizer; its chat template renders chat prompts.
        prompt_key, label_key: the fields holding the prompt and the label.
        max_prompt_tokens: the longest prompt kept whole.
        addition_max_operand: ``builtin:addition`` only.
        overlong: a longer prompt is skipped, truncated to its last ``max_prompt_tokens`` tokens
            (the end holds the question and the generation prompt), or an error.
        strict: a malformed row is an error rather than skipped.
        split: the split of a saved ``DatasetDict``.
        responses_keys: fields of dataset responses to keep with each prompt (a row without
            them has none; one of another type is malformed).
        max_response_tokens: a longer dataset response is left out and counted
            (``report.candidates_overlong``); None: no limit.

    Raises:
        DataError: an unreadable source, an empty one or one without a usable row; with
            ``strict``, a malformed row; with ``overlong="error"``, an overlong prompt; a chat
            prompt and a tokenizer without a chat template.
    """
    if overlong not in ("skip", "truncate", "error"):
        raise ValueError(f"overlong={overlong!r}; expected 'skip', 'truncate' or 'error'")
    where, records = _source_records(source, addition_max_operand, split)
    if source.startswith("builtin:"):
        prompt_key, label_key = "prompt", "label"
    if not records:
        raise DataError(f"{where}: no rows")
    report = LoadReport(source=source, max_prompt_tokens=max_prompt_tokens, rows=len(records))
    if responses_keys:
        report.candidates = 0
    token_ids, labels, rows, responses = [], [], [], []
    for index, record in enumerate(records):
        at = f"{where}, {record.location}"
        try:
            if record.problem is not None:
                raise _BadRow(record.problem)
            prompt, label = _prompt_and_label(record.row, prompt_key, label_key)
            ids = _token_ids(prompt, tokenizer, at)
            if responses_keys:
                from orchestration.sft_data import response_token_ids

                texts = _responses(record.row, responses_keys)
                answers = [response_token_ids(prompt, t, tokenizer, at) for t in texts]
        except _BadRow as bad:
            skip_malformed(report, at, bad, strict)
            continue
        if len(ids) > max_prompt_tokens:
            if overlong == "error":
                raise DataError(
                    f"{at}: prompt has {len(ids)} tokens, more than data.max_prompt_tokens="
                    f"{max_prompt_tokens}; raise it, or skip or truncate overlong prompts"
                )
            if overlong == "skip":
                report.overlong_skipped += 1
                continue
            ids, report.truncated = ids[-max_prompt_tokens:], report.truncated + 1
        token_ids.append(ids)
        labels.append(None if label is None else str(label))
        rows.append(index)
        if responses_keys:
            limit = max_response_tokens
            kept = [a for a in answers if limit is None or len(a) <= limit]
            report.candidates += len(kept)
            report.candidates_overlong += len(answers) - len(kept)
            responses.append(kept)
    report.loaded = len(token_ids)
    if not token_ids:
        first = "; ".join(report.problems[:3])
        raise DataError(
            f"{where}: no usable rows: {report.rows} read, {report.malformed} malformed, "
            f"{report.overlong_skipped} over data.max_prompt_tokens={max_prompt_tokens}"
            + (f"; first problems: {first}" if first else "")
        )
    return PromptSet(
        token_ids=token_ids, labels=labels, rows=rows, responses=responses, report=report
    )
