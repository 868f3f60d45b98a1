"""Evaluation during training: a held-out prompt set, its own sampling (greedy, or n samples for
pass@k), scored by the run's reward components without shaping.

The generators serve the current weights, so an evaluation before iteration k measures the
policy that generates iteration k's rollouts (version k); the last one runs after the final
iteration. Results go into that iteration's metrics as ``eval/*`` and, whole, into
``<run_dir>/eval/iter_<k>.parquet``.
"""

from __future__ import annotations

from math import comb
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rollout import schema as S


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from ``n`` samples of which ``c`` are correct (Chen et al.,
    2021): the chance that ``k`` of the ``n`` drawn without replacement hold a correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    return 1.0 - comb(n - c, k) / comb(n, k)


def ks_up_to(n: int) -> list[int]:
    """1, 2, 4, ... up to ``n``, and ``n`` itself."""
    ks = [k for k in (2**i for i in range(n.bit_length())) if k <= n]
    return ks if ks[-1] == n else [*ks, n]


def eval_metrics(table: pa.Table, correct_component: str, threshold: float) -> dict[str, float]:
    """``eval/*`` metrics of a generated and scored table (one ``reward/<name>`` column per
    component): each component's mean, pass@k over each prompt's samples by
    ``correct_component >= threshold`` (an unscorable sample counts as wrong), response length
    and truncation."""
    prefix = S.REWARD_COLUMN_PREFIX
    metrics: dict[str, float] = {"eval/prompts": float(len(pc.unique(table[S.PROMPT_ID])))}
    for name in table.column_names:
        if name.startswith(prefix) and "/" not in name.removeprefix(prefix):
            values = table[name].combine_chunks().fill_null(float("nan"))
            metrics[f"eval/{name.removeprefix(prefix)}/mean"] = float(
                np.nanmean(values.to_numpy(zero_copy_only=False))
            )
    lengths = pc.list_value_length(table[S.RESPONSE_TOKEN_IDS]).to_numpy()
    metrics["eval/response_length"] = float(lengths.mean())
    metrics["eval/truncated_fraction"] = float(
        np.mean(table[S.FINISH_REASON].to_numpy(zero_copy_only=False) == "length")
    )
    scores = table[prefix + correct_component].combine_chunks().fill_null(float("-inf"))
    correct = scores.to_numpy(zero_copy_only=False) >= threshold
    prompt_ids = table[S.PROMPT_ID].to_numpy()
    groups = [correct[prompt_ids == p] for p in np.unique(prompt_ids)]
    n = min(len(g) for g in groups)
    for k in ks_up_to(n):
        metrics[f"eval/pass@{k}"] = float(
            np.mean([pass_at_k(len(g), int(g.sum()), k) for g in groups])
        )
    return metrics


def write_table(table: pa.Table, path: Path) -> None:
    """Parquet, written to a temporary name and renamed: a reader never sees half a file."""
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
