"""Supervised (SFT) datasets: prompt and response tokens with a per-token loss mask, tokenized and
checked before any actor starts.

Sources are those of ``orchestration.data``: ``builtin:addition``, JSON lines, Parquet, Arrow IPC
and ``datasets`` directories. A row is read as the first of these that fits:

1. a prompt under ``prompt_key`` and its response under ``response_key``. A string prompt is
   tokenized as it is and the response gets the EOS token; a prompt of chat messages is rendered
   with the chat template and a generation prompt, and the response is what rendering the
   conversation with the response as an assistant turn adds to it. Every response token is in
   the loss.
2. chat, ``{"messages": [...]}``: the prompt is the conversation before its first assistant
   message; the response is the rest. Only assistant turns are in the loss (their content and
   the template's end-of-turn tokens, not their headers); user and system turns are context.
3. Alpaca, ``{"instruction", "input", "output", "history": [[user, assistant], ...]}``: the
   prompt is the history, then the instruction (and input) as a user turn, through the chat
   template if the tokenizer has one, else as plain text (each turn followed by a blank line);
   the response is ``output``, every token in the loss.

4. plain text, ``{"text": ...}`` (pretraining data for the PTX term): the first token is the
   context and every later token, and the EOS, is in the loss.
5. an episode, ``{"prompt": str, "turns": [{"role": "model" | "observation", "content": str}]}``
   (multi-turn demonstrations: tool calls and their results): each turn tokenized on its own
   and appended, as a multi-turn rollout builds the sequence (``actors.episodes``: with a chat
   template an observation is its ``tool`` turn and the next assistant prompt, the model's turn
   closed first); the model's turns are in the loss, the last one followed by EOS, and the
   observations are context.

``builtin:addition`` gives ``"a+b="`` -> ``"c"`` with EOS; ``builtin:calculator`` gives the
calculator task's demonstrations (:func:`calculator_demonstrations`). An example longer than
``max_tokens`` (prompt and response together) is skipped, truncated at the end of its response,
or an error.
Malformed rows are skipped, counted and described with their file and line, as in
``orchestration.data``; with ``strict=True`` the first one is an error.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import pyarrow as pa

from orchestration.data import (
    DataError,
    LoadReport,
    Overlong,
    _alpaca,
    _BadRow,
    _messages,
    _Record,
    _source_records,
    addition_examples,
    skip_malformed,
)
from rollout import schema as S

DATASET_ROW = S.DATASET_ROW


@dataclass(frozen=True)
class SupervisedSet:
    """Tokenized supervised examples; index ``i`` is one example in every list.

    ``prompt_ids[i]``: context tokens, never in the loss. ``response_ids[i]``: the tokens after
    the prompt. ``loss_masks[i]``: one float per response token, 1.0 in the loss and 0.0 not.
    ``rows[i]``: the source row example ``i`` came from (its index among the source's rows).
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    loss_masks: list[list[float]]
    rows: list[int]
    report: LoadReport

    def __len__(self) -> int:
        return len(self.response_ids)

    def tokens(self) -> int:
        """Tokens in the loss, over all examples."""
        return int(sum(sum(mask) for mask in self.loss_masks))


class _Example(NamedTuple):
    prompt: list[int]
    response: list[int]
    mask: list[float]


# ------------------------------------------------------------------------------ tokenizing


def _text_ids(text: str, tokenizer) -> list[int]:
    return [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]


def _eos(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError(
            "the tokenizer has no EOS token, so a plain-text response cannot be ended; "
            "give a tokenizer that has one"
        )
    return int(tokenizer.eos_token_id)


def _render(messages: list[dict], tokenizer, at: str, *, generation_prompt: bool) -> list[int]:
    """The chat template's tokens for ``messages``."""
    if getattr(tokenizer, "chat_template", None) is None:
        # Not the row's fault: every chat row would fail the same way.
        raise DataError(
            f"{at}: the row is a chat conversation, but the tokenizer has no chat template; "
            "give string prompts, or a tokenizer that has one"
        )
    from jinja2 import TemplateError

    try:
        out = tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=True
        )
    except TemplateError as e:
        raise _BadRow(f"the chat template rejects the messages ({e})") from None
    # transformers 5 returns a BatchEncoding; older versions the ids.
    ids = out["input_ids"] if isinstance(out, Mapping) else out
    return [int(t) for t in ids]


def _extends(longer: list[int], shorter: list[int], what: str) -> None:
    if longer[: len(shorter)] != shorter:
        raise _BadRow(
            f"the chat template does not extend the prompt: {what}, so the response's tokens "
            "cannot be told apart from the context"
        )


def _chat_response(messages: list[dict], response: str, tokenizer, at: str) -> _Example:
    """``messages`` as the prompt, ``response`` as the assistant turn after it, all in the loss."""
    prompt = _render(messages, tokenizer, at, generation_prompt=True)
    turn = {"role": "assistant", "content": response}
    full = _render([*messages, turn], tokenizer, at, generation_prompt=False)
    _extends(full, prompt, "the rendering with the response does not start with the prompt")
    return _Example(prompt, full[len(prompt) :], [1.0] * (len(full) - len(prompt)))


def _conversation(messages: list[dict], tokenizer, at: str) -> _Example:
    """The turns before the first assistant message as the prompt; assistant turns in the loss.

    Assistant message ``i`` covers the tokens from the rendering of ``messages[:i]`` with a
    generation prompt (so its header is context) to the rendering of ``messages[: i + 1]``.
    """
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise _BadRow("'messages' has no assistant message, so nothing to learn")
    if turns[0] == 0:
        raise _BadRow("'messages' has nothing before its first assistant message")
    # (messages rendered, generation prompt): every rendering a prefix of the next.
    steps = [(n, gen) for i in turns for n, gen in ((i, True), (i + 1, False))]
    if turns[-1] + 1 < len(messages):
        steps.append((len(messages), False))
    renders = [_render(messages[:n], tokenizer, at, generation_prompt=g) for n, g in steps]
    for k in range(1, len(steps)):
        (n, gen), after = steps[k - 1], steps[k][0]
        context = f"messages[:{n}]" + (" and a generation prompt" if gen else "")
        _extends(
            renders[k],
            renders[k - 1],
            f"the rendering of messages[:{after}] does not start with that of {context}",
        )
    prompt, full = renders[0], renders[-1]
    mask = [0.0] * (len(full) - len(prompt))
    for j in range(len(turns)):  # renders[2j], renders[2j + 1]: before and after assistant turn j
        start, end = len(renders[2 * j]) - len(prompt), len(renders[2 * j + 1]) - len(prompt)
        mask[start:end] = [1.0] * (end - start)
    return _Example(prompt, full[len(prompt) :], mask)


def _plain(prompt: str, response: str, tokenizer) -> _Example:
    ids = _text_ids(response, tokenizer) + [_eos(tokenizer)]
    return _Example(_text_ids(prompt, tokenizer), ids, [1.0] * len(ids))


def response_token_ids(prompt: str | list[dict], response: str, tokenizer, at: str) -> list[int]:
    """``response``'s tokens after ``prompt`` as this stage trains them: the text and EOS after
    a string prompt, the chat template's assistant turn after chat messages."""
    if isinstance(prompt, str):
        return _plain(prompt, response, tokenizer).response
    return _chat_response(prompt, response, tokenizer, at).response


def _text(text, tokenizer) -> _Example:
    """Plain text (pretraining data, PTX): its first token is the context, every later token
    and the EOS are in the loss."""
    if not isinstance(text, str) or not text.strip():
        raise _BadRow("'text' is not a non-empty string")
    ids = _text_ids(text, tokenizer) + [_eos(tokenizer)]
    if len(ids) < 2:
        raise _BadRow("'text' tokenizes to nothing")
    return _Example(ids[:1], ids[1:], [1.0] * (len(ids) - 1))


@functools.lru_cache(maxsize=4)
def _observation_format(tokenizer):
    """How a rollout appends observations for this tokenizer (read off its chat template once)."""
    from actors.episodes import ObservationFormat

    return ObservationFormat(tokenizer, "tool")


def _episode(prompt, turns, tokenizer) -> _Example:
    """A multi-turn demonstration: the model's turns in the loss, observations not."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise _BadRow("an episode's 'prompt' must be a non-empty string")
    if not isinstance(turns, list) or not turns:
        raise _BadRow("'turns' must be a non-empty list of {role, content}")
    from actors.episodes import Fault

    try:
        observations = _observation_format(tokenizer)
    except ValueError as e:
        raise _BadRow(str(e)) from None
    response: list[int] = []
    mask: list[float] = []
    for i, turn in enumerate(turns):
        role = turn.get("role") if isinstance(turn, dict) else None
        content = turn.get("content") if isinstance(turn, dict) else None
        if role not in ("model", "observation") or not isinstance(content, str):
            raise _BadRow(f"turns[{i}] is not {{role: model | observation, content: str}}")
        if (role == "model") != (i % 2 == 0):
            raise _BadRow("turns alternate, starting and ending with the model's")
        try:  # a model turn that calls a tool ends at its closing tag, not at end-of-turn
            ids = (
                _text_ids(content, tokenizer)
                if role == "model"
                else observations.ids(content, False)
            )
        except Fault as e:
            raise _BadRow(str(e)) from None
        response += ids
        mask += [1.0 if role == "model" else 0.0] * len(ids)
    if len(turns) % 2 == 0:
        raise _BadRow("turns alternate, starting and ending with the model's")
    response.append(_eos(tokenizer))
    mask.append(1.0)
    return _Example(_text_ids(prompt, tokenizer), response, mask)


def calculator_demonstrations(
    max_operand: int, large: int = 200, call_share: float = 0.5, seed: int = 1
) -> list[dict]:
    """Demonstrations of the calculator task: its sums of small operands answered directly,
    and ``large`` sums of large ones (none of the RL prompts of ``builtin:calculator``, so
    imitation cannot learn those answers by heart), ``call_share`` of them by calling the
    calculator and answering with its result, the others answered directly."""
    from orchestration.data import calculator_examples

    rl_prompts = frozenset(p for p, _ in calculator_examples(max_operand))
    rng = random.Random(seed)
    rows = []
    for prompt, answer in calculator_examples(max_operand, large, seed, rl_prompts):
        small = all(int(x) <= max_operand for x in prompt[:-1].split("+"))
        if small or rng.random() >= call_share:
            rows.append({"prompt": prompt, "response": answer})
            continue
        turns = [
            {"role": "model", "content": f"<calc>{prompt[:-1]}</calc>"},
            {"role": "observation", "content": f"<result>{answer}</result>"},
            {"role": "model", "content": answer},
        ]
        rows.append({"prompt": prompt, "turns": turns})
    return rows


def _example(row: dict, tokenizer, at: str, prompt_key: str, response_key: str) -> _Example:
    """A row's example, by the first format that fits (see the module docstring)."""
    if row.get("turns") is not None:
        return _episode(row.get(prompt_key), row["turns"], tokenizer)
    if row.get(prompt_key) is not None:
        prompt, response = row[prompt_key], row.get(response_key)
        if response is None:
            raise _BadRow(f"no '{response_key}' (a row with '{prompt_key}' needs one)")
        if not isinstance(response, str):
            raise _BadRow(f"'{response_key}' is a {type(response).__name__}; expected a string")
        if not response.strip():
            raise _BadRow(f"'{response_key}' is empty")
        if isinstance(prompt, str):
            if not prompt.strip():
                raise _BadRow(f"'{prompt_key}' is empty")
            return _plain(prompt, response, tokenizer)
        if isinstance(prompt, list):
            return _chat_response(_messages(prompt, prompt_key), response, tokenizer, at)
        raise _BadRow(
            f"'{prompt_key}' is a {type(prompt).__name__}; "
            "expected a string or a list of chat messages"
        )
    if row.get("messages") is not None:
        return _conversation(_messages(row["messages"], "messages"), tokenizer, at)
    if row.get("instruction") is not None:
        output = row.get("output")
        if isinstance(output, list):
            raise _BadRow(
                "'output' is a list: a preference row (chosen and rejected), not a supervised one"
            )
        if not isinstance(output, str) or not output.strip():
            raise _BadRow("'output' is not a non-empty string")
        messages = _alpaca(row)
        if getattr(tokenizer, "chat_template", None) is not None:
            return _chat_response(messages, output, tokenizer, at)
        return _plain("".join(m["content"] + "\n\n" for m in messages), output, tokenizer)
    if row.get("text") is not None:
        return _text(row["text"], tokenizer)
    raise _BadRow(
        f"no '{prompt_key}' (every row needs '{prompt_key}' and '{response_key}', 'messages', "
        "'instruction' and 'output', or 'text')"
    )


# ------------------------------------------------------------------------------ loading


def load_supervised(
    source: str,
    tokenizer,
    *,
    max_tokens: int,
    addition_max_operand: int = 9,
    overlong: Overlong = "skip",
    strict: bool = False,
    split: str = "train",
    prompt_key: str = "prompt",
    response_key: str = "response",
) -> SupervisedSet:
    """Read and tokenize every example of ``source`` (see the module docstring for formats).

    Args:
        source: ``builtin:addition``, a file path, or a ``datasets`` directory.
        tokenizer: a Hugging Face tokenizer; its chat template renders chat rows.
        max_tokens: the longest example (prompt and response) kept whole; the report's
            ``max_prompt_tokens`` holds it.
        addition_max_operand: ``builtin:addition`` only.
        overlong: a longer example is skipped, truncated (the end of its response cut, the
            mask with it; skipped if no token in the loss is left), or an error.
        strict: a malformed row is an error rather than skipped.
        split: the split of a saved ``DatasetDict``.
        prompt_key, response_key: the fields of the prompt/response format.

    Raises:
        DataError: an unreadable source, an empty one or one without a usable row; with
            ``strict``, a malformed row; with ``overlong="error"``, an overlong example; a chat
            row and a tokenizer without a chat template.
    """
    if overlong not in ("skip", "truncate", "error"):
        raise ValueError(f"overlong={overlong!r}; expected 'skip', 'truncate' or 'error'")
    if max_tokens < 2:
        raise ValueError(f"max_tokens={max_tokens}; an example needs a prompt and a response")
    if source == "builtin:addition":
        pairs = addition_examples(addition_max_operand)
        where, prompt_key, response_key = source, "prompt", "response"
        records = [
            _Record(f"row {i}", {"prompt": p, "response": a}) for i, (p, a) in enumerate(pairs)
        ]
    elif source == "builtin:calculator":
        demos = calculator_demonstrations(addition_max_operand)
        where, prompt_key, response_key = source, "prompt", "response"
        records = [_Record(f"row {i}", row) for i, row in enumerate(demos)]
    else:
        where, records = _source_records(source, addition_max_operand, split)
    if not records:
        raise DataError(f"{where}: no rows")
    report = LoadReport(source=source, max_prompt_tokens=max_tokens, rows=len(records))
    prompts, responses, masks, rows = [], [], [], []
    for index, record in enumerate(records):
        at = f"{where}, {record.location}"
        try:
            if record.problem is not None:
                raise _BadRow(record.problem)
            example = _example(record.row, tokenizer, at, prompt_key, response_key)
            if not example.prompt:
                raise _BadRow("the prompt tokenizes to nothing")
            if not example.response:
                raise _BadRow("the response tokenizes to nothing")
        except _BadRow as bad:
            skip_malformed(report, at, bad, strict)
            continue
        prompt, response, mask = example
        if len(prompt) + len(response) > max_tokens:
            if overlong == "error":
                raise DataError(
                    f"{at}: example has {len(prompt) + len(response)} tokens ({len(prompt)} "
                    f"prompt, {len(response)} response), more than max_tokens={max_tokens}; "
                    "raise it, or skip or truncate overlong examples"
                )
            keep = max(max_tokens - len(prompt), 0)
            if overlong == "skip" or not any(mask[:keep]):
                report.overlong_skipped += 1
                continue
            response, mask, report.truncated = response[:keep], mask[:keep], report.truncated + 1
        prompts.append(prompt)
        responses.append(response)
        masks.append(mask)
        rows.append(index)
    report.loaded = len(responses)
    if not responses:
        first = "; ".join(report.problems[:3])
        raise DataError(
            f"{where}: no usable rows: {report.rows} read, {report.malformed} malformed, "
            f"{report.overlong_skipped} over max_tokens={max_tokens}"
            + (f"; first problems: {first}" if first else "")
        )
    return SupervisedSet(prompts, responses, masks, rows, report)


# ------------------------------------------------------------------------------ batches


def supervised_table(
    examples: SupervisedSet, indices: Sequence[int], first_id: int = 0
) -> pa.Table:
    """Examples ``indices`` as a table, one row each: ``prompt_id`` (``first_id`` onwards),
    ``prompt_token_ids``, ``response_token_ids``, ``sft_mask`` (one entry per response token)
    and ``dataset_row``."""
    picked = list(indices)
    fields = [S.KNOWN_FIELDS[name] for name in (S.PROMPT_ID, S.PROMPT_TOKEN_IDS)]
    fields += [S.KNOWN_FIELDS[S.RESPONSE_TOKEN_IDS], S.KNOWN_FIELDS[S.SFT_MASK]]
    fields.append(pa.field(DATASET_ROW, pa.int64(), nullable=False))
    columns = [
        list(range(first_id, first_id + len(picked))),
        [examples.prompt_ids[i] for i in picked],
        [examples.response_ids[i] for i in picked],
        [examples.loss_masks[i] for i in picked],
        [examples.rows[i] for i in picked],
    ]
    arrays = [pa.array(values, f.type) for values, f in zip(columns, fields, strict=True)]
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def split_held_out(examples: SupervisedSet, share: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train, held_out)``: example indices, each list sorted, chosen by a shuffle seeded with
    ``seed``. ``round(share * len)`` are held out, at least one when ``share > 0`` and there are
    two examples or more, and never all of them.
    """
    if not 0.0 <= share < 1.0:
        raise ValueError(f"share={share}; expected at least 0 and less than 1")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = round(share * len(order))
    if share > 0 and len(order) >= 2:
        held = min(max(held, 1), len(order) - 1)
    return sorted(order[held:]), sorted(order[:held])
