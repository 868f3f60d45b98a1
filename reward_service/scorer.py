"""The rule scorer: decodes each sample, runs the reward functions, appends the scores.

A plain class; the driver runs it as a Ray actor. Columns appended: ``reward/<name>`` per
function (float32, null when unscorable) and ``score``, the weighted sum of the functions, null
when any of them is null. A function that raises marks that sample unscorable for it and is
counted in ``reward/errors/<name>``; the first exception of each call is logged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

from reward_service.rules import RewardFunction, resolve
from rollout import schema as S
from rollout.ops import append_columns

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightedReward:
    """One reward function in the sum, by name (see ``reward_service.rules.resolve``)."""

    name: str
    weight: float = 1.0


class RuleScorer:
    """Scores rollout tables with rule-based reward functions.

    Args:
        rewards: the functions and their weights in ``score``.
        tokenizer_path: the policy's tokenizer, to decode prompts and responses.
        label_column: the passthrough column holding each row's label (missing: labels are None).
        no_eos_penalty: the EOS trick (arXiv 2403.17031): a response cut off at the token budget
            (``finish_reason == "length"``) gets this ``score`` instead of the functions' sum.
            None: off.
    """

    def __init__(
        self,
        rewards: Sequence[WeightedReward],
        tokenizer_path: str,
        *,
        label_column: str = "label",
        no_eos_penalty: float | None = None,
        trust_remote_code: bool = False,
    ):
        from transformers import AutoTokenizer

        if not rewards:
            raise ValueError("the scorer needs at least one reward function")
        self.rewards = list(rewards)
        self.functions: dict[str, RewardFunction] = {r.name: resolve(r.name) for r in rewards}
        self.tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_path, trust_remote_code=trust_remote_code
        )
        self.label_column = label_column
        self.no_eos_penalty = no_eos_penalty

    def _decode(self, table: pa.Table, column: str) -> list[str]:
        ids = S.column_array(table, column).to_pylist()
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def score(self, table: pa.Table) -> tuple[pa.Table, dict[str, float]]:
        """``(table with score columns, metrics)``.

        Metrics: ``reward/<name>/mean`` over scorable rows, ``reward/unscorable`` (rows with a
        null ``score``), ``reward/errors/<name>`` (exceptions raised by that function) and, with
        the EOS trick on, ``reward/no_eos`` (responses cut off at the budget).
        """
        prompts = self._decode(table, S.PROMPT_TOKEN_IDS)
        responses = self._decode(table, S.RESPONSE_TOKEN_IDS)
        if self.label_column in table.column_names:
            labels = [None if v is None else str(v) for v in table[self.label_column].to_pylist()]
        else:
            labels = [None] * table.num_rows
        metrics: dict[str, float] = {}
        columns: dict[str, list[float | None]] = {}
        for reward in self.rewards:
            values, errors = _apply(self.functions[reward.name], prompts, responses, labels)
            columns[S.REWARD_COLUMN_PREFIX + reward.name] = values
            metrics[f"reward/errors/{reward.name}"] = float(errors)
            scored = [v for v in values if v is not None]
            if scored:
                metrics[f"reward/{reward.name}/mean"] = sum(scored) / len(scored)
        total = [
            None
            if any(columns[S.REWARD_COLUMN_PREFIX + r.name][i] is None for r in self.rewards)
            else sum(r.weight * columns[S.REWARD_COLUMN_PREFIX + r.name][i] for r in self.rewards)
            for i in range(table.num_rows)
        ]
        if self.no_eos_penalty is not None:
            cut = S.column_array(table, S.FINISH_REASON).to_pylist()
            total = [
                self.no_eos_penalty if f == "length" else v for v, f in zip(total, cut, strict=True)
            ]
            metrics["reward/no_eos"] = float(sum(f == "length" for f in cut))
        metrics["reward/unscorable"] = float(sum(v is None for v in total))
        new = {name: pa.array(v, pa.float32()) for name, v in columns.items()}
        new[S.SCORE] = pa.array(total, pa.float32())
        return append_columns(table, new), metrics


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
