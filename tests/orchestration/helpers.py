"""Pieces the orchestration tests share: a scored rollout and the GRPO advantage spec."""

from __future__ import annotations

import pyarrow as pa

from orchestration.advantages import AdvantageSpec
from rollout import GeneratedSample, append_columns, build_rollout_table


def scored_rollout(scores, version: int = 3) -> pa.Table:
    """Two samples per prompt with the given scores, old and reference log-probabilities."""
    samples = [
        GeneratedSample(
            i // 2, i % 2, [5, 1, 6], [3, 4, 2][: 1 + i % 3], [-1.0] * (1 + i % 3), "stop"
        )
        for i in range(len(scores))
    ]
    table = build_rollout_table(samples, weight_version=version)
    lengths = [1 + i % 3 for i in range(len(scores))]
    old = pa.array([[-1.0 - 0.1 * t for t in range(n)] for n in lengths], pa.list_(pa.float32()))
    ref = pa.array([[-1.5] * n for n in lengths], pa.list_(pa.float32()))
    return append_columns(
        table,
        {
            "old_logprobs": old,
            "ref_logprobs": ref,
            "score": pa.array(scores, pa.float32()),
        },
    )


def grpo_spec(**kw) -> AdvantageSpec:
    return AdvantageSpec(
        estimator="grpo", kl_in_reward=False, needs_critic=False, kl_kind="k3", **kw
    )
