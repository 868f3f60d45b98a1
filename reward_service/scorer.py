"""Reward components computed from decoded text: rule functions, and a remote reward service.

Plain classes; the driver runs each as a Ray actor. Each returns a table of its component
columns, ``reward/<name>`` (float32, null when unscorable), and its metrics; the driver combines
the components and shapes the score (``reward_service.shaping``).

Rule functions are user code and run in child processes (``reward_service.contained``), each
call bounded by a time limit. A call that raises, returns something other than a finite number,
times out or crashes its process marks that sample unscorable for the function and is counted in
``reward/errors/<name>``; :meth:`RuleScorer.problems` keeps each function's first error and
counts for the run, which the driver reports once per function.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from reward_service.contained import ContainedFunction, Problem
from reward_service.remote import RemoteRewardClient, RemoteSpec
from rollout import schema as S


@dataclass(frozen=True)
class RuleSpec:
    """One reward function by name (see ``reward_service.rules.resolve``) and its parameters;
    its column is ``reward/<column>`` (default: the name)."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    column: str | None = None

    @property
    def key(self) -> str:
        return self.column or self.name


class RuleScorer:
    """Rule-based reward functions over decoded prompts and responses.

    Args:
        rules: the functions (each becomes a ``reward/<key>`` column).
        tokenizer_path: the policy's tokenizer, to decode prompts and responses.
        label_column: the passthrough column holding each row's label (missing: labels are None).
        timeout_s: the longest one call of a function may take (``reward.function_timeout_s``).
    """

    def __init__(
        self,
        rules: Sequence[RuleSpec],
        tokenizer_path: str,
        *,
        label_column: str = "label",
        trust_remote_code: bool = False,
        timeout_s: float = 10.0,
    ):
        from transformers import AutoTokenizer

        if not rules:
            raise ValueError("the rule scorer needs at least one reward function")
        self.rules = list(rules)
        self.functions: dict[str, ContainedFunction] = {
            r.key: ContainedFunction(r.name, r.params, timeout_s) for r in rules
        }
        self.tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_path, trust_remote_code=trust_remote_code
        )
        self.label_column = label_column
        self._problems: dict[str, Problem] = {key: Problem() for key in self.functions}

    def score(self, table: pa.Table) -> tuple[pa.Table, dict[str, float]]:
        """``(table of the reward/<key> columns, metrics)``.

        Metrics: ``reward/<key>/mean`` over scorable rows, ``reward/errors/<key>`` (calls that
        raised, returned a non-number or non-finite value, timed out or crashed) and
        ``reward/<key>/unscorable`` (null scores, errors included).
        """
        prompts, responses = decode(self.tokenizer, table)
        labels = labels_of(table, self.label_column)
        metrics: dict[str, float] = {}
        columns = {}
        for key, fn in self.functions.items():
            outcomes = fn(prompts, responses, labels)
            values = [o.value for o in outcomes]
            errors = self._problems[key].record(outcomes)
            columns[S.REWARD_COLUMN_PREFIX + key] = pa.array(values, pa.float32())
            metrics[f"reward/errors/{key}"] = float(errors)
            metrics[f"reward/{key}/unscorable"] = float(sum(v is None for v in values))
            scored = [v for v in values if v is not None]
            if scored:
                metrics[f"reward/{key}/mean"] = sum(scored) / len(scored)
        return pa.table(columns), metrics

    def problems(self) -> dict[str, Problem]:
        """Each function that failed at least once this run: its first error and counts."""
        return {key: p for key, p in self._problems.items() if p.first_error is not None}

    def close(self) -> None:
        for fn in self.functions.values():
            fn.close()


class RemoteScorer:
    """A reward server run elsewhere (``reward_service.remote``) as one reward component.

    Samples the server fails to score (after its retries) are null in ``reward/<name>``: the run
    goes on without them, and ``reward/<name>/unscorable`` counts them.
    """

    def __init__(
        self,
        spec: RemoteSpec,
        tokenizer_path: str,
        *,
        token: str | None = None,
        label_column: str = "label",
        trust_remote_code: bool = False,
    ):
        from transformers import AutoTokenizer

        if token and spec.token_env:  # handed over by the driver's process
            os.environ[spec.token_env] = token
        self.name = spec.name
        self.client = RemoteRewardClient(spec)
        self._failed_samples = self._samples = 0
        self.tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_path, trust_remote_code=trust_remote_code
        )
        self.label_column = label_column

    def score(self, table: pa.Table) -> tuple[pa.Table, dict[str, float]]:
        """``(table of one column reward/<name>, metrics)``."""
        prompts, responses = decode(self.tokenizer, table)
        values, metrics = self.client.score(prompts, responses, labels_of(table, self.label_column))
        self._samples += len(values)
        failed = metrics[f"reward/{self.name}/failed_batches"]
        if failed:  # which samples were in failed batches is not kept; count their nulls
            self._failed_samples += int(metrics[f"reward/{self.name}/unscorable"])
        scored = [v for v in values if v is not None]
        if scored:
            metrics[f"reward/{self.name}/mean"] = sum(scored) / len(scored)
        column = S.REWARD_COLUMN_PREFIX + self.name
        return pa.table({column: pa.array(values, pa.float32())}), metrics

    def problems(self) -> dict[str, Problem]:
        """The service's first failed batch this run, if any, and the samples left unscorable
        in batches that failed."""
        if self.client.first_failure is None:
            return {}
        problem = Problem(self.client.first_failure, self._failed_samples, self._samples)
        return {self.name: problem}


def decode(tokenizer, table: pa.Table) -> tuple[list[str], list[str]]:
    """The decoded prompts and responses of ``table`` (special tokens dropped). A multi-turn
    episode's response is its last model turn (after the last observation): the answer a
    verifier judges."""
    prompts, responses = (
        S.column_array(table, c).to_pylist() for c in (S.PROMPT_TOKEN_IDS, S.RESPONSE_TOKEN_IDS)
    )
    if S.LOSS_MASK in table.column_names:
        masks = S.column_array(table, S.LOSS_MASK).to_pylist()
        responses = [r[_last_turn_start(m) :] for r, m in zip(responses, masks, strict=True)]
    return (
        tokenizer.batch_decode(prompts, skip_special_tokens=True),
        tokenizer.batch_decode(responses, skip_special_tokens=True),
    )


def _last_turn_start(mask: list[float]) -> int:
    """Where the last model turn starts: after the last observation token (0 in the mask)."""
    for i in range(len(mask) - 1, -1, -1):
        if mask[i] == 0.0:
            return i + 1
    return 0


def labels_of(table: pa.Table, column: str) -> list[str | None]:
    """Each row's label as a string, None where missing (or no such column)."""
    if column not in table.column_names:
        return [None] * table.num_rows
    return [None if v is None else str(v) for v in table[column].to_pylist()]
