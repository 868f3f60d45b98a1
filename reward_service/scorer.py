"""Reward components computed from decoded text: rule functions, and a remote reward service.

Plain classes; the driver runs each as a Ray actor. Each returns a table of its component
columns, ``reward/<name>`` (float32, null when unscorable), and its metrics; the driver combines
the components and shapes the score (``reward_service.shaping``). A rule function that raises
marks that sample unscorable for it and is counted in ``reward/errors/<name>``; the first
exception of each call is logged.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from reward_service.remote import RemoteRewardClient, RemoteSpec
from reward_service.rules import RewardFunction, resolve
from rollout import schema as S

logger = logging.getLogger(__name__)


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
    """

    def __init__(
        self,
        rules: Sequence[RuleSpec],
        tokenizer_path: str,
        *,
        label_column: str = "label",
        trust_remote_code: bool = False,
    ):
        from transformers import AutoTokenizer

        if not rules:
            raise ValueError("the rule scorer needs at least one reward function")
        self.rules = list(rules)
        self.functions: dict[str, RewardFunction] = {
            r.key: resolve(r.name, dict(r.params)) for r in rules
        }
        self.tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_path, trust_remote_code=trust_remote_code
        )
        self.label_column = label_column

    def score(self, table: pa.Table) -> tuple[pa.Table, dict[str, float]]:
        """``(table of the reward/<key> columns, metrics)``.

        Metrics: ``reward/<key>/mean`` over scorable rows and ``reward/errors/<key>``
        (exceptions raised by that function).
        """
        prompts, responses = decode(self.tokenizer, table)
        labels = labels_of(table, self.label_column)
        metrics: dict[str, float] = {}
        columns = {}
        for key, fn in self.functions.items():
            values, errors = _apply(fn, prompts, responses, labels)
            columns[S.REWARD_COLUMN_PREFIX + key] = pa.array(values, pa.float32())
            metrics[f"reward/errors/{key}"] = float(errors)
            scored = [v for v in values if v is not None]
            if scored:
                metrics[f"reward/{key}/mean"] = sum(scored) / len(scored)
        return pa.table(columns), metrics


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
        self.tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_path, trust_remote_code=trust_remote_code
        )
        self.label_column = label_column

    def score(self, table: pa.Table) -> tuple[pa.Table, dict[str, float]]:
        """``(table of one column reward/<name>, metrics)``."""
        prompts, responses = decode(self.tokenizer, table)
        values, metrics = self.client.score(prompts, responses, labels_of(table, self.label_column))
        scored = [v for v in values if v is not None]
        if scored:
            metrics[f"reward/{self.name}/mean"] = sum(scored) / len(scored)
        column = S.REWARD_COLUMN_PREFIX + self.name
        return pa.table({column: pa.array(values, pa.float32())}), metrics


def decode(tokenizer, table: pa.Table) -> tuple[list[str], list[str]]:
    """The decoded prompts and responses of ``table`` (special tokens dropped)."""
    return tuple(
        tokenizer.batch_decode(S.column_array(table, c).to_pylist(), skip_special_tokens=True)
        for c in (S.PROMPT_TOKEN_IDS, S.RESPONSE_TOKEN_IDS)
    )


def labels_of(table: pa.Table, column: str) -> list[str | None]:
    """Each row's label as a string, None where missing (or no such column)."""
    if column not in table.column_names:
        return [None] * table.num_rows
    return [None if v is None else str(v) for v in table[column].to_pylist()]


def _apply(
    fn: RewardFunction, prompts: list[str], responses: list[str], labels: list[str | None]
) -> tuple[list[float | None], int]:
    values, errors = [], 0
    for prompt, response, label in zip(prompts, responses, labels, strict=True):
        try:
            value = fn(prompt, response, label)
        except Exception:  # noqa: BLE001 - user code: any failure makes this sample unscorable
            if not errors:
                logger.warning("reward function %r raised; sample unscorable", fn, exc_info=True)
            errors += 1
            value = None
        if value is not None:
            value = float(value)
            if not math.isfinite(value):
                value = None  # a NaN/inf score is as unscorable as None, not a number to train on
        values.append(value)
    return values, errors
