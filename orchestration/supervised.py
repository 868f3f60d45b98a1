"""The supervised stages' inputs and calls: SFT examples or reward-model prompt groups, split into
training and held-out sets before any actor starts, and the learner calls a supervised iteration
makes (the loop is ``orchestration.loop.SupervisedLoop``).

``stage: sft`` reads ``data.source`` with ``orchestration.sft_data``; ``stage: rm`` reads it with
``orchestration.preferences`` (ties and cyclic preferences dropped, and with
``rm.balance_lengths`` the length buckets balanced, on the training groups only: the held-out
groups stay as the data has them), plus the reference responses of ``rm.normalize_source`` and
the equal-quality pairs of ``rm.equal_quality_source``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from orchestration import calls
from orchestration.config import RunConfig
from orchestration.stages import Trained


@dataclass
class SupervisedInputs:
    """A supervised stage's data: ``size`` training items (examples or prompt groups),
    ``table(indices, first_id)`` building a batch of them, the held-out table, and for a
    reward model the groups to normalise its bias on and to measure its length bias with."""

    kind: str
    size: int
    table: Callable[[Sequence[int], int], pa.Table]
    held_out: pa.Table | None
    summary: str
    metrics: dict[str, float] = field(default_factory=dict)
    normalize: pa.Table | None = None
    equal_quality: pa.Table | None = None
    lines: list[str] = field(default_factory=list)  # problems and bucket counts to print

    def __len__(self) -> int:
        return self.size


def load_sft(cfg: RunConfig, tokenizer, source: str, max_tokens: int):
    """``source``'s supervised examples as ``orchestration.sft_data`` reads them."""
    from orchestration.sft_data import load_supervised

    return load_supervised(
        source,
        tokenizer,
        max_tokens=max_tokens,
        addition_max_operand=cfg.data.addition_max_operand,
        overlong=cfg.data.overlong,
        strict=cfg.data.strict,
        split=cfg.data.split,
        prompt_key=cfg.data.prompt_key,
        response_key=cfg.sft.response_key,
    )


def load_inputs(cfg: RunConfig, tokenizer) -> SupervisedInputs:
    """Read, check and split the stage's data (see the module docstring)."""
    if cfg.stage == "sft":
        return _sft_inputs(cfg, tokenizer)
    if cfg.stage == "dpo":
        return _dpo_inputs(cfg, tokenizer)
    return _rm_inputs(cfg, tokenizer)


def _sft_inputs(cfg: RunConfig, tokenizer) -> SupervisedInputs:
    from orchestration.sft_data import split_held_out, supervised_table

    examples = load_sft(cfg, tokenizer, cfg.data.source, cfg.sft.max_tokens)
    train, held = split_held_out(examples, cfg.sft.held_out, cfg.data.seed)
    report = examples.report

    def table(indices: Sequence[int], first_id: int) -> pa.Table:
        return supervised_table(examples, [train[i] for i in indices], first_id)

    return SupervisedInputs(
        kind="sft",
        size=len(train),
        table=table,
        held_out=supervised_table(examples, held) if held else None,
        summary=f"{report.summary()}; {len(train)} for training, {len(held)} held out",
        metrics=report.metrics(),
        lines=[f"  skipped: {p}" for p in report.problems[:5]],
    )


def _groups(cfg: RunConfig, tokenizer, source: str):
    from orchestration.preferences import load_preferences

    dpo = cfg.stage == "dpo"
    return load_preferences(
        source,
        tokenizer,
        max_tokens=cfg.dpo.max_tokens if dpo else cfg.rm.max_tokens,
        margins=_NoMargins() if dpo else cfg.rm.margins,  # DPO reads no margin
        strict=cfg.data.strict,
        split=cfg.data.split,
    )


class _NoMargins(dict):
    """Every strength label maps to margin 0: DPO takes a pair's direction, not its strength."""

    def __contains__(self, key) -> bool:
        return isinstance(key, str)

    def __missing__(self, key) -> float:
        return 0.0


def _dpo_inputs(cfg: RunConfig, tokenizer) -> SupervisedInputs:
    """Offline DPO's preference groups (ties and cycles dropped, as for a reward model),
    split into training and held-out groups."""
    from orchestration.preferences import split_groups

    groups, report = _groups(cfg, tokenizer, cfg.data.source)
    train, held = split_groups(groups, cfg.dpo.held_out, cfg.data.seed)
    _require_pairs(cfg, train, report)
    return _group_inputs(
        "dpo", train, held, report, [f"  skipped: {p}" for p in report.problems[:5]]
    )


def _require_pairs(cfg: RunConfig, train: list, report) -> None:
    if not train:
        from orchestration.data import DataError

        raise DataError(f"{cfg.data.source}: no training pairs left ({report.summary()})")


def _group_inputs(kind: str, train: list, held: list, report, lines: list[str], **extra):
    """Prompt groups for training and held out as a stage's inputs."""
    from orchestration.preferences import preference_table

    pairs = sum(len(g.pairs) for g in train)
    return SupervisedInputs(
        kind=kind,
        size=len(train),
        table=lambda indices, first_id: preference_table([train[i] for i in indices], first_id),
        held_out=preference_table(held) if held else None,
        summary=f"{report.summary()}; {len(train)} groups ({pairs} pairs) for training, "
        f"{len(held)} held out",
        metrics=report.metrics(),
        lines=lines,
        **extra,
    )


def _rm_inputs(cfg: RunConfig, tokenizer) -> SupervisedInputs:
    from orchestration.preferences import balance_lengths, preference_table, split_groups

    rm = cfg.rm
    groups, report = _groups(cfg, tokenizer, cfg.data.source)
    train, held = split_groups(groups, rm.held_out, cfg.data.seed)
    if rm.balance_lengths:
        train, buckets, dropped = balance_lengths(train, rm.length_buckets, cfg.data.seed)
        report.buckets, report.balance_dropped = buckets, dropped
    _require_pairs(cfg, train, report)
    lines = [f"  skipped: {p}" for p in report.problems[:5]]
    lines += [
        f"  length difference {b['bucket']}: longer response chosen in {b['longer_chosen']} "
        f"pairs, rejected in {b['longer_rejected']}, equal {b['equal']}; kept "
        f"{b['kept_longer_chosen']} + {b['kept_longer_rejected']}"
        for b in report.buckets
    ]
    normalize = equal = None
    if rm.normalize_source is not None:
        from orchestration.sft_data import supervised_table

        ref = load_sft(cfg, tokenizer, rm.normalize_source, rm.max_tokens)
        normalize = _single_response_groups(supervised_table(ref, range(len(ref))))
    if rm.equal_quality_source is not None:
        equal_groups, _ = _groups(cfg, tokenizer, rm.equal_quality_source)
        equal = preference_table(equal_groups)
    return _group_inputs("rm", train, held, report, lines, normalize=normalize, equal_quality=equal)


def _single_response_groups(table: pa.Table) -> pa.Table:
    """Supervised rows as prompt groups of one response and no pair (for scoring)."""
    from rollout import schema as S

    responses = S.column_array(table, S.RESPONSE_TOKEN_IDS).to_pylist()
    empty_i = pa.array([[]] * table.num_rows, pa.list_(pa.int32()))
    return pa.table(
        {
            S.PROMPT_ID: table[S.PROMPT_ID],
            S.PROMPT_TOKEN_IDS: table[S.PROMPT_TOKEN_IDS],
            S.RESPONSES: pa.array([[r] for r in responses], pa.list_(S.TOKEN_IDS_TYPE)),
            S.PAIR_CHOSEN: empty_i,
            S.PAIR_REJECTED: empty_i,
            S.PAIR_MARGIN: pa.array([[]] * table.num_rows, pa.list_(pa.float32())),
        }
    )


def split_for_ranks(table: pa.Table, ranks: int) -> list[pa.Table]:
    """``table``'s rows in ``ranks`` consecutive parts as even as they go (some may be empty)."""
    bounds = np.linspace(0, table.num_rows, ranks + 1).round().astype(int)
    return [table.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


class SupervisedStages:
    """A supervised iteration's calls over the learner ranks (each waits, bounded)."""

    def __init__(self, cfg: RunConfig, actors):
        self.cfg, self.actors = cfg, actors
        self.timeout = cfg.cluster.call_timeout_s

    def _each(self, method: str, table: pa.Table, stage: str, *args) -> list:
        learners = self.actors.learners
        parts = split_for_ranks(table, len(learners))
        refs = [getattr(r, method).remote(p, *args) for r, p in zip(learners, parts, strict=True)]
        return calls.wait(refs, stage, self.timeout)

    def train(self, table: pa.Table) -> Trained:
        """One optimizer step (per mini-batch) on ``table``, its rows split over the ranks."""
        results = self._each("train", table, "train")
        metrics = {k: float(np.mean([m[k] for m in results])) for k in results[0]}
        skipped = max(int(m["learner/skipped_in_a_row"]) for m in results)
        return Trained(metrics=metrics, skipped_in_a_row=skipped)

    def evaluate(self, table: pa.Table) -> dict[str, float]:
        """The objective's metrics on ``table`` (the ranks agree on them: all-reduced)."""
        return self._each("evaluate", table, "evaluate")[0]

    def score(self, table: pa.Table) -> list[list[float]]:
        """The reward model's score of every response of every prompt group."""
        return [g for part in self._each("score", table, "score") for g in part]

    def reference_logprobs(self, table: pa.Table) -> pa.Table:
        """``table`` (prompt and response rows) with the frozen reference's ``ref_logprobs``
        (offline DPO)."""
        return calls.wait(self.actors.reference.logprobs.remote(table), "reference", self.timeout)

    def shift_bias(self, delta: float) -> float:
        refs = [r.shift_rm_bias.remote(delta) for r in self.actors.learners]
        return calls.wait(refs, "normalise the reward model", self.timeout)[0]


def rm_evaluation(stages: SupervisedStages, table: pa.Table, edges: Sequence[int]) -> dict:
    """``orchestration.rm_eval.rm_metrics`` of the reward model on ``table``'s pairs."""
    from orchestration.rm_eval import rm_metrics
    from rollout import schema as S

    scores = stages.score(table)
    chosen, rejected, chosen_len, rejected_len = [], [], [], []
    responses = table.column(S.RESPONSES).to_pylist()
    for group, s, cs, rs in zip(
        responses,
        scores,
        table.column(S.PAIR_CHOSEN).to_pylist(),
        table.column(S.PAIR_REJECTED).to_pylist(),
        strict=True,
    ):
        for c, r in zip(cs, rs, strict=True):
            chosen.append(s[c])
            rejected.append(s[r])
            chosen_len.append(len(group[c]))
            rejected_len.append(len(group[r]))
    return rm_metrics(
        np.array(chosen), np.array(rejected), np.array(chosen_len), np.array(rejected_len), edges
    )
