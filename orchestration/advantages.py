"""The advantages stage: a pure function of the scored rollout table, on CPU, without Ray.

KL to the reference, token rewards (with the KL in the reward for PPO and REINFORCE++), the
estimator's advantages and returns, and the rollout's metrics. The KL coefficient comes in (the
loop's controller owns it and updates it from the ``kl_ref`` returned here).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from learner.algorithms import (
    AdvantageInputs,
    compute_advantages,
    kl_estimate,
    masked_mean,
    token_rewards,
)
from rollout import schema as S
from rollout.groups import zero_spread_fraction
from rollout.ops import append_columns, group_ids
from rollout.tensors import model_token_mask, to_list_column, to_padded


@dataclass(frozen=True)
class AdvantageSpec:
    """What the stage needs from the config (``orchestration.specs.advantage_spec``)."""

    estimator: str
    kl_in_reward: bool
    needs_critic: bool
    kl_kind: str
    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool = True
    pad_token_id: int = 0
    distill_coef: float = 0.0  # on-policy distillation: the reverse-KL token reward's weight
    max_staleness: int = 0  # the most versions a row may be behind the weights being trained


@dataclass(frozen=True)
class Advantages:
    table: pa.Table  # the input with ``advantages`` and ``returns`` appended
    metrics: dict[str, float]
    kl_ref: float | None  # mean KL(old || ref) over response tokens: the KL controller's input
    # (None without old_logprobs: on-policy updates report it from the train stage)


def advantages(table: pa.Table, spec: AdvantageSpec, kl_coef: float, version: int) -> Advantages:
    """Advantages and returns of a scored rollout for the weights of ``version``, which needs
    ``rollout_logprobs``, ``ref_logprobs``, ``score`` (null: unscorable), with a critic
    ``values``, and ``old_logprobs`` unless the update is on-policy (``specs.on_policy``: then
    the train stage reports the metrics that need them, and the KL is not in the reward).

    Every row's ``weight_version`` is within ``spec.max_staleness`` versions of ``version``
    (0: all of them ``version``); with a bound, ``rollout/staleness_mean``, ``_max`` and the
    histogram ``rollout/staleness_<s>`` (the share of rows ``s`` versions behind)."""
    rows = S.column_array(table, S.WEIGHT_VERSION).to_numpy()
    staleness = version - rows
    k = spec.max_staleness
    if len(rows) and (staleness.min() < 0 or staleness.max() > k):
        versions = sorted(set(rows.tolist()))
        raise RuntimeError(
            f"rollout has weight versions {versions}; training version {version} takes only "
            + (f"{version}" if k == 0 else f"{max(version - k, 0)}..{version} (max_staleness={k})")
        )
    has_old = S.OLD_LOGPROBS in table.column_names
    if not has_old and (spec.kl_in_reward or spec.needs_critic or spec.distill_coef):
        raise ValueError(
            "the KL in the reward, the critic and distillation need the learner's old_logprobs"
        )
    columns = [S.ROLLOUT_LOGPROBS, S.REF_LOGPROBS] + [S.OLD_LOGPROBS] * has_old
    if spec.needs_critic:
        columns.append(S.VALUES)
    batch = to_padded(table, pad_token_id=spec.pad_token_id, per_token_columns=columns)
    # The model's tokens: a multi-turn episode's observation tokens (``loss_mask`` 0) get no
    # reward, KL, value target or advantage.
    t, mask = batch.per_token, model_token_mask(table, batch.response_mask)
    score_col = S.column_array(table, S.SCORE)
    scores = torch.from_numpy(
        np.array(score_col.fill_null(float("nan")).to_numpy(zero_copy_only=False), np.float32)
    )
    kl = kl_estimate(t[S.OLD_LOGPROBS], t[S.REF_LOGPROBS], spec.kl_kind) if has_old else None
    inputs = AdvantageInputs(
        response_mask=mask,
        scores=scores,
        group_ids=group_ids(table),
        token_rewards=token_rewards(scores, kl, mask, kl_coef) if spec.kl_in_reward else None,
        values=t.get(S.VALUES),
        gamma=spec.gamma,
        lam=spec.lam,
        whiten_advantages=spec.whiten,
    )
    adv, returns = compute_advantages(spec.estimator, inputs)
    distill = {}
    if spec.distill_coef:
        adv, distill = distill_advantages(adv, t[S.OLD_LOGPROBS], t[S.REF_LOGPROBS], mask, spec)
    scorable = torch.isfinite(scores)
    finish = S.column_array(table, S.FINISH_REASON)
    lengths = batch.response_lengths
    prompt_tokens = pc.sum(pc.list_value_length(S.column_array(table, S.PROMPT_TOKEN_IDS)))
    metrics = {
        "reward/score_mean": float(scores[scorable].mean()) if scorable.any() else float("nan"),
        "reward/score_max": float(scores[scorable].max()) if scorable.any() else float("nan"),
        "reward/unscorable_fraction": float((~scorable).float().mean()),
        "rollout/samples": float(table.num_rows),
        "rollout/response_length": float(lengths.float().mean()),
        "rollout/response_tokens": float(lengths.sum()),
        "rollout/prompt_tokens": float(prompt_tokens.as_py()),
        "rollout/stop_fraction": float(pc.mean(pc.equal(finish, "stop")).as_py()),
        "rollout/truncated_fraction": float(pc.mean(pc.equal(finish, "length")).as_py()),
        "reward/zero_spread_groups": zero_spread_fraction(scores.numpy(), inputs.group_ids.numpy()),
        "rollout/weight_version": float(version),
        "advantage/mean": float(masked_mean(adv, mask)),
        "advantage/abs_mean": float(masked_mean(adv.abs(), mask)),
    } | distill
    kl_ref = None
    if has_old:
        kl_ref = float(masked_mean(t[S.OLD_LOGPROBS] - t[S.REF_LOGPROBS], mask))
        mismatch = (t[S.ROLLOUT_LOGPROBS] - t[S.OLD_LOGPROBS]).abs()
        metrics |= {
            "actor/kl_ref": kl_ref,
            "rollout/logprob_mismatch": float(masked_mean(mismatch, mask)),
            "rollout/logprob_mismatch_max": float(torch.where(mask, mismatch, 0).max()),
        }
    padding = batch.response_mask
    new = {
        S.ADVANTAGES: to_list_column(adv, padding),
        S.RETURNS: to_list_column(returns, padding),
    }
    if k:
        metrics["rollout/staleness_mean"] = float(staleness.mean()) if len(rows) else 0.0
        metrics["rollout/staleness_max"] = float(staleness.max()) if len(rows) else 0.0
        for s in range(k + 1):
            metrics[f"rollout/staleness_{s}"] = float((staleness == s).mean()) if len(rows) else 0.0
    if S.TOKEN_VERSIONS in table.column_names:
        metrics |= token_version_metrics(table, version)
    if S.LOSS_MASK in table.column_names:
        metrics |= episode_metrics(table, mask)
    return Advantages(table=append_columns(table, new), metrics=metrics, kl_ref=kl_ref)


def token_version_metrics(table: pa.Table, version: int) -> dict[str, float]:
    """Partial rollouts: ``rollout/partial_fraction``, the share of rows whose tokens came from
    more than one weight version (a weight update reached them mid-way), and
    ``rollout/token_staleness_mean``, how many versions the response tokens are behind
    ``version`` on average (at most the rows' staleness)."""
    versions = S.column_array(table, S.TOKEN_VERSIONS)
    flat = versions.flatten().to_numpy(zero_copy_only=False)
    if not flat.size:
        return {"rollout/partial_fraction": 0.0, "rollout/token_staleness_mean": 0.0}
    first = S.column_array(table, S.WEIGHT_VERSION).to_numpy()
    parents = np.asarray(pc.list_parent_indices(versions))
    newest = np.full(len(first), np.iinfo(np.int64).min)
    np.maximum.at(newest, parents, flat)
    return {
        "rollout/partial_fraction": float((newest > first).mean()),
        "rollout/token_staleness_mean": float((version - flat).mean()),
    }


def episode_metrics(table: pa.Table, model_tokens: torch.Tensor) -> dict[str, float]:
    """Multi-turn episodes: ``episode/turns_mean``, ``episode/tool_calls_mean``,
    ``episode/tool_call_rate`` (the share of episodes with at least one tool call),
    ``episode/model_tokens`` (tokens in the loss), ``episode/observation_tokens``,
    ``episode/reward_mean`` (the environment's own rewards) and ``episode/end/<reason>``, the
    share of episodes that ended so (``done``, ``max_turns``, ``max_tokens``, or
    ``<tool>:<fault>``: a tool or the environment raised, hung or returned garbage)."""
    n = max(table.num_rows, 1)
    calls = S.column_array(table, S.TOOL_CALLS).to_numpy()
    lengths = pc.sum(pc.list_value_length(S.column_array(table, S.LOSS_MASK))).as_py() or 0
    model = int(model_tokens.sum())
    metrics = {
        "episode/turns_mean": float(S.column_array(table, S.TURNS).to_numpy().mean()),
        "episode/tool_calls_mean": float(calls.mean()),
        "episode/tool_call_rate": float((calls > 0).mean()),
        "episode/model_tokens": float(model),
        "episode/observation_tokens": float(lengths - model),
        "episode/reward_mean": float(
            S.column_array(table, S.EPISODE_REWARD).to_numpy(zero_copy_only=False).mean()
        ),
    }
    ends = pc.value_counts(S.column_array(table, S.EPISODE_END)).to_pylist()
    for entry in ends:
        metrics[f"episode/end/{entry['values']}"] = entry["counts"] / n
    return metrics


def distill_advantages(
    adv: torch.Tensor,
    logprobs: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    spec: AdvantageSpec,
) -> tuple[torch.Tensor, dict[str, float]]:
    """On-policy distillation: each response token's advantage gains
    ``coef x (log teacher(y_t) - log policy(y_t))``, the negative of the per-token reverse KL
    ``KL(policy || teacher)`` estimated on the policy's own sample (no discount, no baseline:
    the token's own term). Zero where the teacher agrees with the policy. Returns the new
    advantages and ``distill/reverse_kl`` (the mean estimate over response tokens)."""
    gap = torch.where(mask, teacher - logprobs, 0.0)
    return adv + spec.distill_coef * gap, {"distill/reverse_kl": float(-masked_mean(gap, mask))}


def throughput(metrics: dict[str, float], timings: dict[str, float]) -> dict[str, float]:
    """``perf/``: samples and tokens (prompt + response) per second of the whole iteration, and
    generated tokens per second of the generate stage."""
    seconds = timings["timing/iteration"]
    tokens = metrics["rollout/prompt_tokens"] + metrics["rollout/response_tokens"]
    return {
        "perf/samples_per_s": metrics["rollout/samples"] / seconds,
        "perf/tokens_per_s": tokens / seconds,
        "perf/generated_tokens_per_s": metrics["rollout/response_tokens"]
        / timings["timing/generate"],
    }
