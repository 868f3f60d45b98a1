"""Prompt datasets: the built-in task and user files, tokenized and checked before any actor starts.

A dataset row is a prompt (a string, or a list of chat messages rendered with the tokenizer's chat
template) and an optional label. Bad rows fail at load time with the file and row named.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from rollout import schema as S


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file and row."""


# ------------------------------------------------------------------------------ built-in task


def addition_examples(max_operand: int) -> list[tuple[str, str]]:
    """The built-in task: ``"a+b="`` -> ``"c"`` for every pair of operands in 0..max_operand.

    A random policy almost never answers with the right number and then stops, so it scores near
    0 under ``exact_integer``; the answer is one or two tokens, so a tiny model learns it by RL in
    minutes.
    """
    return [
        (f"{a}+{b}=", str(a + b)) for a in range(max_operand + 1) for b in range(max_operand + 1)
    ]


def addition_corpus(max_operand: int) -> list[str]:
    """Text to train the demo tokenizer on (every prompt followed by its answer)."""
    return [prompt + answer for prompt, answer in addition_examples(max_operand)]


# ------------------------------------------------------------------------------ files


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"dataset {path}, line {i + 1}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise DataError(f"dataset {path}, line {i + 1}: expected a JSON object")
            rows.append(row)
        return rows
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise DataError(f"dataset {path}: unsupported format '{path.suffix}'; use .jsonl or .parquet")


@dataclass(frozen=True)
class PromptSet:
    """Tokenized prompts with their labels (None where a row has none)."""

    token_ids: list[list[int]]
    labels: list[str | None]

    def __len__(self) -> int:
        return len(self.token_ids)


def load_prompts(
    source: str,
    tokenizer,
    *,
    prompt_key: str = "prompt",
    label_key: str = "label",
    max_prompt_tokens: int,
    addition_max_operand: int = 9,
) -> PromptSet:
    """Read and tokenize every prompt of ``source``, checking each row.

    Raises:
        DataError: a row without a prompt, an empty or over-long prompt, an empty dataset.
    """
    if source == "builtin:addition":
        rows = [{"prompt": p, "label": a} for p, a in addition_examples(addition_max_operand)]
        prompt_key, label_key, where = "prompt", "label", "builtin:addition"
    elif source.startswith("builtin:"):
        raise DataError(
            f"unknown built-in dataset {source!r}; the built-in one is builtin:addition"
        )
    else:
        rows, where = read_rows(Path(source)), f"dataset {source}"
    if not rows:
        raise DataError(f"{where}: no rows")
    token_ids, labels = [], []
    for i, row in enumerate(rows):
        prompt = row.get(prompt_key)
        if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
            raise DataError(f"{where}, row {i}: no '{prompt_key}' (every row needs a prompt)")
        if isinstance(prompt, list):
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        elif isinstance(prompt, str):
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            raise DataError(
                f"{where}, row {i}: '{prompt_key}' is a {type(prompt).__name__}; "
                "expected a string or a list of chat messages"
            )
        if not ids:
            raise DataError(f"{where}, row {i}: the prompt tokenizes to nothing")
        if len(ids) > max_prompt_tokens:
            raise DataError(
                f"{where}, row {i}: prompt has {len(ids)} tokens, more than "
                f"data.max_prompt_tokens={max_prompt_tokens}"
            )
        label = row.get(label_key)
        token_ids.append(list(ids))
        labels.append(None if label is None else str(label))
    return PromptSet(token_ids=token_ids, labels=labels)


class PromptSampler:
    """Draws prompt batches in shuffled passes over the prompt set (each pass a new order).

    ``prompt_id`` counts draws over the run, so it is unique even when a prompt comes twice in a
    batch; ``dataset_row`` says which prompt it was.
    """

    def __init__(self, prompts: PromptSet, seed: int):
        self.prompts = prompts
        self._rng = np.random.default_rng(seed)
        self._order = self._rng.permutation(len(prompts))
        self._pos = 0
        self.epoch = 0
        self.drawn = 0

    def next_batch(self, size: int) -> pa.Table:
        """The next ``size`` prompts: prompt_id, prompt_token_ids, label, dataset_row."""
        rows = []
        while len(rows) < size:
            if self._pos == len(self._order):
                self._order = self._rng.permutation(len(self.prompts))
                self._pos, self.epoch = 0, self.epoch + 1
            rows.append(int(self._order[self._pos]))
            self._pos += 1
        ids = np.arange(self.drawn, self.drawn + size, dtype=np.int64)
        self.drawn += size
        return pa.table(
            {
                S.PROMPT_ID: pa.array(ids),
                S.PROMPT_TOKEN_IDS: pa.array(
                    [self.prompts.token_ids[r] for r in rows], S.TOKEN_IDS_TYPE
                ),
                "label": pa.array([self.prompts.labels[r] for r in rows], pa.string()),
                "dataset_row": pa.array(rows, pa.int64()),
            }
        )


def all_prompts(prompts: PromptSet) -> pa.Table:
    """Every prompt once, in dataset order (``prompt_id == dataset_row``): the input of a pass
    over the whole dataset, such as the reference baselines."""
    rows = np.arange(len(prompts), dtype=np.int64)
    return pa.table(
        {
            S.PROMPT_ID: pa.array(rows),
            S.PROMPT_TOKEN_IDS: pa.array(prompts.token_ids, S.TOKEN_IDS_TYPE),
            "label": pa.array(prompts.labels, pa.string()),
            "dataset_row": pa.array(rows),
        }
    )
