"""Preference data for reward-model training: read, tokenized, cleaned, and grouped by prompt.

Sources are those of ``orchestration.data`` (JSON lines, Parquet, Arrow IPC, ``datasets``
directories). A row is read as the first of these that fits:

1. pairs, ``{"prompt", "chosen", "rejected", "margin"?, "strength"?}``: the prompt a string or
   chat messages, each response a string or chat messages. Without a prompt (HH style), chosen
   and rejected are two conversations that agree up to a final assistant message each: the prompt
   is the messages they share, each response its final message. The margin (Llama 2) is
   ``margin`` if given, else ``strength`` (``"significantly better"``) through ``margins``, else 0.
2. rankings, ``{"prompt", "responses": [best, ..., worst]}``: all K-choose-2 pairs, margin 0.
3. Alpaca rankings, ``{"instruction", "input"?, "output": [best, ..., worst], "history"?}``: the
   prompt as ``orchestration.sft_data`` builds it (chat template if the tokenizer has one, else
   plain text, each turn followed by a blank line); pairs as in 2.

Tokens: a text response is its tokens and EOS (the reward model reads its score at the last real
token, which for a finished response is its EOS). A chat-message response is what rendering the
conversation with it adds to the prompt's rendering with a generation prompt; a string prompt
with chat-message responses is a user turn. Rows whose prompts tokenize the same are one
``PromptGroup`` whose responses are distinct token sequences.

Cleaning, in order: malformed rows skipped (named with file and line; ``strict=True`` raises);
rows with a prompt and response longer than ``max_tokens`` skipped; ties (chosen tokens equal to
rejected tokens) dropped; cyclic preferences dropped (``drop_cycles``). Length balancing
(``balance_lengths``, ChatGLM-RLHF) is the caller's choice and not done here.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from itertools import combinations, pairwise
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from orchestration.data import (
    DataError,
    _alpaca,
    _BadRow,
    _messages,
    _source_records,
    _token_ids,
    skip_malformed,
)
from orchestration.sft_data import _eos, _extends, _render, _text_ids
from rollout import schema as S
from rollout.schema import PAIR_CHOSEN, PAIR_MARGIN, PAIR_REJECTED, RESPONSES

PREFERENCE_FIELDS: tuple[pa.Field, ...] = (
    S.KNOWN_FIELDS[S.PROMPT_ID],
    S.KNOWN_FIELDS[S.PROMPT_TOKEN_IDS],
    pa.field(RESPONSES, pa.list_(S.TOKEN_IDS_TYPE), nullable=False),
    pa.field(PAIR_CHOSEN, pa.list_(pa.int32()), nullable=False),
    pa.field(PAIR_REJECTED, pa.list_(pa.int32()), nullable=False),
    pa.field(PAIR_MARGIN, pa.list_(pa.float32()), nullable=False),
)
"""The columns of ``preference_table``, one row per prompt group."""


@dataclass(frozen=True)
class Pair:
    """``responses[chosen]`` is preferred to ``responses[rejected]`` by ``margin``."""

    chosen: int
    rejected: int
    margin: float = 0.0


@dataclass(frozen=True)
class PromptGroup:
    """One prompt, its distinct responses (each used by a pair) and the preferences among them.

    ``location``: ``"<source>, line N"`` (or ``row N``) of the first row with this prompt.
    """

    prompt_ids: tuple[int, ...]
    responses: tuple[tuple[int, ...], ...]
    pairs: tuple[Pair, ...]
    location: str


@dataclass
class PreferenceReport:
    """What ``load_preferences`` made of a source: rows and pairs read, skipped and dropped.

    ``pairs == pairs_read - ties_dropped - cyclic_dropped``; ``pairs`` and ``groups`` are what
    ``load_preferences`` returned. ``balance_dropped`` and ``buckets`` are the caller's to fill from
    ``balance_lengths``. ``problems``: the first 100 malformed rows' messages; counts are exact.
    """

    source: str = ""
    rows: int = 0
    malformed: int = 0
    overlong_skipped: int = 0
    pairs_read: int = 0
    ties_dropped: int = 0
    cyclic_dropped: int = 0
    balance_dropped: int = 0
    pairs: int = 0
    groups: int = 0
    buckets: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the log."""
        line = (
            f"loaded {self.pairs} preference pairs in {self.groups} prompt groups from "
            f"{self.rows} rows of {self.source}; skipped {self.malformed} malformed and "
            f"{self.overlong_skipped} overlong rows; of {self.pairs_read} pairs read, dropped "
            f"{self.ties_dropped} ties and {self.cyclic_dropped} cyclic"
        )
        if self.buckets:
            line += f"; length balancing dropped {self.balance_dropped}"
        return line

    def metrics(self) -> dict[str, float]:
        """The counts (every int field) as ``rm_data/`` metrics."""
        counts = [f.name for f in fields(self) if isinstance(getattr(self, f.name), int)]
        return {f"rm_data/{name}": float(getattr(self, name)) for name in counts}


# ------------------------------------------------------------------------------ rows

Text = str | list[dict]  # a string, or chat messages


class _Row(NamedTuple):
    """A row before tokenizing: its prompt, responses (``names`` for messages) and
    ``(better, worse, margin)`` pairs, indices into ``responses``."""

    prompt: Text
    responses: list[Text]
    names: list[str]
    pairs: list[tuple[int, int, float]]


def _text(value, key: str) -> Text:
    if isinstance(value, str):
        if not value.strip():
            raise _BadRow(f"'{key}' is empty")
        return value
    if isinstance(value, list):
        return _messages(value, key)
    raise _BadRow(f"'{key}' is a {type(value).__name__}; expected a string or chat messages")


def _margin(row: dict, margins: Mapping[str, float] | None) -> float:
    margin, strength = row.get("margin"), row.get("strength")
    if margin is not None:
        number = isinstance(margin, int | float) and not isinstance(margin, bool)
        if not number or not math.isfinite(margin):
            raise _BadRow(f"'margin' is {margin!r:.40}; expected a finite number")
        return float(margin)
    if strength is None:
        return 0.0
    if margins is None:
        raise _BadRow(
            f"'strength' is {strength!r:.40}, but no margins were given to turn strengths "
            "into margins; give margins, or a numeric 'margin'"
        )
    if not isinstance(strength, str) or strength not in margins:
        known = ", ".join(repr(k) for k in margins)
        raise _BadRow(f"unknown 'strength' {strength!r:.40}; known strengths: {known}")
    return float(margins[strength])


def _shared_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], Text, Text]:
    """HH style: the messages two conversations share, and each one's final assistant message."""
    n, ends = len(chosen) - 1, {chosen[-1]["role"], rejected[-1]["role"]}
    if len(rejected) - 1 != n or chosen[:n] != rejected[:n] or ends != {"assistant"}:
        raise _BadRow(
            "without a 'prompt', 'chosen' and 'rejected' must be one conversation up to a final "
            "assistant message each"
        )
    if n == 0:
        raise _BadRow("without a 'prompt', 'chosen' has nothing before its assistant message")
    return chosen[:n], [chosen[-1]], [rejected[-1]]


def _ranking(prompt: Text, responses, key: str) -> _Row:
    if not isinstance(responses, list) or len(responses) < 2:
        raise _BadRow(f"'{key}' is not a list of two responses or more, best first")
    names = [f"{key}[{i}]" for i in range(len(responses))]
    texts = [_text(value, name) for value, name in zip(responses, names, strict=True)]
    pairs = [(i, j, 0.0) for i, j in combinations(range(len(texts)), 2)]
    return _Row(prompt, texts, names, pairs)


def _parse(row: dict, margins: Mapping[str, float] | None, chat: bool) -> _Row:
    """A row by the first format that fits (see the module docstring)."""
    if row.get("chosen") is not None or row.get("rejected") is not None:
        chosen, rejected = row.get("chosen"), row.get("rejected")
        if chosen is None or rejected is None:
            raise _BadRow("a pair row needs both 'chosen' and 'rejected'")
        margin = _margin(row, margins)
        if row.get("prompt") is not None:
            prompt = _text(row["prompt"], "prompt")
            chosen, rejected = _text(chosen, "chosen"), _text(rejected, "rejected")
        elif isinstance(chosen, list) and isinstance(rejected, list):
            chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
            prompt, chosen, rejected = _shared_prompt(chosen, rejected)
        else:
            raise _BadRow("no 'prompt' (only chat-message 'chosen' and 'rejected' may omit it)")
        return _Row(prompt, [chosen, rejected], ["chosen", "rejected"], [(0, 1, margin)])
    if row.get("responses") is not None:
        if row.get("prompt") is None:
            raise _BadRow("no 'prompt' (a ranking row needs 'prompt' and 'responses')")
        return _ranking(_text(row["prompt"], "prompt"), row["responses"], "responses")
    if row.get("instruction") is not None:
        if isinstance(row.get("output"), str):
            raise _BadRow("'output' is a string: a supervised row, not a ranking")
        messages = _alpaca(row)
        prompt = messages if chat else "".join(m["content"] + "\n\n" for m in messages)
        return _ranking(prompt, row.get("output"), "output")
    raise _BadRow(
        "not a preference row: expected 'chosen' and 'rejected' (with 'prompt', or as chat "
        "conversations), 'prompt' and 'responses', or 'instruction' and a list 'output'"
    )


def _tokenize(row: _Row, tokenizer, at: str) -> tuple[list[int], list[list[int]]]:
    """The prompt's tokens and each response's (see the module docstring)."""
    is_chat = [isinstance(r, list) for r in row.responses]
    if not any(is_chat):
        eos = _eos(tokenizer)
        prompt = _token_ids(row.prompt, tokenizer, at)
        return prompt, [_text_ids(text, tokenizer) + [eos] for text in row.responses]
    if not all(is_chat):
        raise _BadRow("the responses mix strings and chat messages; give all of one kind")
    context = (
        row.prompt if isinstance(row.prompt, list) else [{"role": "user", "content": row.prompt}]
    )
    prompt = _render(context, tokenizer, at, generation_prompt=True)
    if not prompt:
        raise _BadRow("the prompt tokenizes to nothing")
    responses = []
    for messages, name in zip(row.responses, row.names, strict=True):
        if messages[: len(context)] == context:  # a whole conversation, the prompt included
            messages = messages[len(context) :]
        if not messages:
            raise _BadRow(f"'{name}' is the prompt with nothing after it")
        full = _render([*context, *messages], tokenizer, at, generation_prompt=False)
        _extends(full, prompt, f"the rendering with '{name}' does not start with the prompt's")
        if len(full) == len(prompt):
            raise _BadRow(f"'{name}' tokenizes to nothing")
        responses.append(full[len(prompt) :])
    return prompt, responses


# ------------------------------------------------------------------------------ groups


class _Tokenized(NamedTuple):
    location: str
    prompt: list[int]
    responses: list[list[int]]
    pairs: list[tuple[int, int, float]]


def _merge(rows: Sequence[_Tokenized]) -> tuple[list[PromptGroup], int]:
    """Rows with the same prompt tokens as one group, responses deduplicated by tokens and ties
    dropped; returns the groups with a pair (in order of first row) and the ties dropped."""
    merged: dict[tuple[int, ...], tuple[str, dict[tuple[int, ...], int], list[Pair]]] = {}
    ties = 0
    for row in rows:
        _, index, pairs = merged.setdefault(tuple(row.prompt), (row.location, {}, []))
        for better, worse, margin in row.pairs:
            chosen, rejected = tuple(row.responses[better]), tuple(row.responses[worse])
            if chosen == rejected:
                ties += 1
                continue
            i = index.setdefault(chosen, len(index))
            pairs.append(Pair(i, index.setdefault(rejected, len(index)), margin))
    groups = [
        PromptGroup(prompt, tuple(index), tuple(pairs), location)
        for prompt, (location, index, pairs) in merged.items()
        if pairs
    ]
    return groups, ties


def _keep_pairs(group: PromptGroup, keep: Sequence[Pair]) -> PromptGroup:
    """``group`` with only the pairs ``keep``, and only the responses they use (renumbered)."""
    used = sorted({i for pair in keep for i in (pair.chosen, pair.rejected)})
    new = {old: new for new, old in enumerate(used)}
    pairs = tuple(Pair(new[p.chosen], new[p.rejected], p.margin) for p in keep)
    return PromptGroup(
        group.prompt_ids, tuple(group.responses[i] for i in used), pairs, group.location
    )


def _components(n: int, edges: Sequence[tuple[int, int]]) -> list[int]:
    """A strongly connected component label for each of ``n`` nodes (Kosaraju: finishing order
    by depth-first search, then search the reversed graph in reverse finishing order); iterative,
    so long chains cannot reach Python's recursion limit."""
    out: list[list[int]] = [[] for _ in range(n)]
    into: list[list[int]] = [[] for _ in range(n)]
    for a, b in edges:
        out[a].append(b)
        into[b].append(a)
    seen, finished = [False] * n, []
    for root in range(n):
        if seen[root]:
            continue
        seen[root], stack = True, [(root, iter(out[root]))]
        while stack:
            node, successors = stack[-1]
            step = next((m for m in successors if not seen[m]), None)
            if step is None:
                finished.append(stack.pop()[0])
            else:
                seen[step] = True
                stack.append((step, iter(out[step])))
    label = [-1] * n
    for root in reversed(finished):
        if label[root] != -1:
            continue
        label[root], stack = root, [root]
        while stack:
            for m in into[stack.pop()]:
                if label[m] == -1:
                    label[m] = root
                    stack.append(m)
    return label


def drop_cycles(groups: Sequence[PromptGroup]) -> tuple[list[PromptGroup], int]:
    """Drop every pair whose two responses are on a preference cycle; returns the groups left
    (those without a pair removed) and the pairs dropped.

    Pairs are edges chosen -> rejected; a pair is dropped when both its responses are in one
    strongly connected component: A>B, B>C, C>A drops all three, A>B with B>A drops both.
    """
    kept, dropped = [], 0
    for group in groups:
        label = _components(len(group.responses), [(p.chosen, p.rejected) for p in group.pairs])
        keep = [p for p in group.pairs if label[p.chosen] != label[p.rejected]]
        dropped += len(group.pairs) - len(keep)
        if keep:
            kept.append(group if len(keep) == len(group.pairs) else _keep_pairs(group, keep))
    return kept, dropped


# ------------------------------------------------------------------------------ loading


def load_preferences(
    source: str,
    tokenizer,
    *,
    max_tokens: int,
    margins: Mapping[str, float] | None = None,
    strict: bool = False,
    split: str = "train",
) -> tuple[list[PromptGroup], PreferenceReport]:
    """Read, tokenize and clean every preference row of ``source`` (see the module docstring).

    Args:
        source: a file path or a ``datasets`` directory.
        tokenizer: a Hugging Face tokenizer; its chat template renders chat rows.
        max_tokens: the longest prompt and response kept; a row with a longer one is skipped.
        margins: annotator strength (``"significantly better"``) -> margin, for rows that give a
            ``strength`` rather than a ``margin``.
        strict: a malformed row is an error rather than skipped.
        split: the split of a saved ``DatasetDict``.

    Returns:
        The prompt groups in order of their first row, and the report.

    Raises:
        DataError: an unreadable or empty source, or one without a usable pair; with ``strict``,
            a malformed row; a chat row and a tokenizer without a chat template.
    """
    if max_tokens < 2:
        raise ValueError(f"max_tokens={max_tokens}; a sequence needs a prompt and a response")
    if source.startswith("builtin:"):
        raise DataError(f"{source}: no built-in preference dataset; give a file or directory")
    where, records = _source_records(source, 0, split)
    if not records:
        raise DataError(f"{where}: no rows")
    report = PreferenceReport(source=source, rows=len(records))
    chat = getattr(tokenizer, "chat_template", None) is not None
    rows = []
    for record in records:
        at = f"{where}, {record.location}"
        try:
            if record.problem is not None:
                raise _BadRow(record.problem)
            row = _parse(record.row, margins, chat)
            prompt, responses = _tokenize(row, tokenizer, at)
        except _BadRow as bad:
            skip_malformed(report, at, bad, strict)
            continue
        if len(prompt) + max(len(r) for r in responses) > max_tokens:
            report.overlong_skipped += 1
            continue
        report.pairs_read += len(row.pairs)
        rows.append(_Tokenized(at, prompt, responses, row.pairs))
    groups, report.ties_dropped = _merge(rows)
    groups, report.cyclic_dropped = drop_cycles(groups)
    report.pairs, report.groups = sum(len(g.pairs) for g in groups), len(groups)
    if not groups:
        first = "; ".join(report.problems[:3])
        raise DataError(
            f"{where}: no usable preference pair: {report.rows} rows read, {report.malformed} "
            f"malformed, {report.overlong_skipped} over max_tokens={max_tokens}; of "
            f"{report.pairs_read} pairs, {report.ties_dropped} ties and {report.cyclic_dropped} "
            "cyclic" + (f"; first problems: {first}" if first else "")
        )
    return groups, report


# ------------------------------------------------------------------------------ balancing


def length_bucket(diff: int, edges: Sequence[int]) -> int:
    """The bucket of a length difference: ``i`` with ``edges[i] <= diff < edges[i + 1]``, the last
    bucket ``[edges[-1], inf)``."""
    if diff < 0:
        raise ValueError(f"diff={diff}; a length difference is at least 0")
    return bisect_right(edges, diff) - 1


def _check_edges(edges: Sequence[int]) -> None:
    ints = all(isinstance(e, int) and not isinstance(e, bool) for e in edges)
    if not edges or edges[0] != 0 or not ints or any(b <= a for a, b in pairwise(edges)):
        raise ValueError(f"edges={list(edges)}; expected ascending integers from 0, e.g. [0, 1, 3]")


def balance_lengths(
    groups: Sequence[PromptGroup], edges: Sequence[int], seed: int
) -> tuple[list[PromptGroup], list[dict], int]:
    """Bucket-based length balancing (ChatGLM-RLHF): in each bucket of the length difference
    ``d = |len(chosen) - len(rejected)|`` (response tokens), as many pairs whose longer response
    is chosen as pairs whose longer response is rejected, so length alone cannot win.

    The larger side of each bucket is downsampled (``numpy.random.default_rng(seed)``) to the
    size of the other; pairs with ``d == 0`` are kept. Returns the groups left (pairs dropped,
    groups without a pair removed), one dict per bucket (``bucket`` as ``"[lo, hi)"``,
    ``longer_chosen``, ``longer_rejected``, ``equal``, ``kept_longer_chosen``,
    ``kept_longer_rejected``) and the pairs dropped.
    """
    _check_edges(edges)
    # sides[bucket][0 | 1]: (group, pair) of pairs whose longer response is chosen | rejected
    sides: list[tuple[list, list]] = [([], []) for _ in edges]
    equal = [0] * len(edges)
    for g, group in enumerate(groups):
        for p, pair in enumerate(group.pairs):
            diff = len(group.responses[pair.chosen]) - len(group.responses[pair.rejected])
            bucket = length_bucket(abs(diff), edges)
            if diff == 0:
                equal[bucket] += 1
            else:
                sides[bucket][0 if diff > 0 else 1].append((g, p))
    rng, dropped, report = np.random.default_rng(seed), set(), []
    for b, (chosen, rejected) in enumerate(sides):
        size = min(len(chosen), len(rejected))
        for side in (chosen, rejected):
            if len(side) > size:
                keep = set(rng.choice(len(side), size=size, replace=False).tolist())
                dropped.update(side[i] for i in range(len(side)) if i not in keep)
        hi = edges[b + 1] if b + 1 < len(edges) else "inf"
        counts = {"longer_chosen": len(chosen), "longer_rejected": len(rejected), "equal": equal[b]}
        sizes = {"kept_longer_chosen": size, "kept_longer_rejected": size}
        report.append({"bucket": f"[{edges[b]}, {hi})", **counts, **sizes})
    kept = []
    for g, group in enumerate(groups):
        keep = [pair for p, pair in enumerate(group.pairs) if (g, p) not in dropped]
        if keep:
            kept.append(group if len(keep) == len(group.pairs) else _keep_pairs(group, keep))
    return kept, report, len(dropped)


# ------------------------------------------------------------------------------ tables


def preference_table(groups: Sequence[PromptGroup], first_id: int = 0) -> pa.Table:
    """One row per group (``prompt_id`` from ``first_id`` on): the prompt, its responses and its
    pairs as parallel lists of chosen index, rejected index and margin (``PREFERENCE_FIELDS``)."""
    columns = [
        list(range(first_id, first_id + len(groups))),
        [list(g.prompt_ids) for g in groups],
        [[list(r) for r in g.responses] for g in groups],
        [[p.chosen for p in g.pairs] for g in groups],
        [[p.rejected for p in g.pairs] for g in groups],
        [[p.margin for p in g.pairs] for g in groups],
    ]
    arrays = [pa.array(v, f.type) for v, f in zip(columns, PREFERENCE_FIELDS, strict=True)]
    return pa.Table.from_arrays(arrays, schema=pa.schema(PREFERENCE_FIELDS))


def split_groups(
    groups: Sequence[PromptGroup], share: float, seed: int
) -> tuple[list[PromptGroup], list[PromptGroup]]:
    """``(train, held_out)`` by prompt: ``round(share * prompts)`` distinct prompts held out, at
    least one when ``share > 0`` and there are two or more, never all; chosen by a shuffle
    seeded with ``seed``. Every group of a prompt goes the same way; each list keeps the order
    of ``groups``."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"share={share}; expected at least 0 and less than 1")
    prompts = list(dict.fromkeys(g.prompt_ids for g in groups))
    held = round(share * len(prompts))
    if share > 0 and len(prompts) >= 2:
        held = min(max(held, 1), len(prompts) - 1)
    order = np.random.default_rng(seed).permutation(len(prompts))
    held_out = {prompts[i] for i in order[:held].tolist()}
    return (
        [g for g in groups if g.prompt_ids not in held_out],
        [g for g in groups if g.prompt_ids in held_out],
    )
