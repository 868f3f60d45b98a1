"""From scored samples to what the preference and ranking methods train on (pure functions).

A scored rollout table (``prompt_id``, ``prompt_token_ids``, ``response_token_ids``, ``score``;
one row per sample, the samples of a prompt sharing its ``prompt_id``) becomes:

- :func:`best_worst_pairs`: one prompt group per prompt, its best and worst sample as the
  pair (online DPO, ChatGLM-RLHF's construction);
- :func:`ranked_groups`: one prompt group per prompt, every distinct candidate with every pair
  ordered by score and the best candidate marked (RRHF);
- :func:`best_of_n`: each prompt's best sample, if it clears a threshold, as a supervised row
  (rejection-sampling fine-tuning).

:func:`dataset_candidates` makes the rows of a prompt's dataset responses (RRHF), to be scored
with its samples; :func:`best_sources` says where each prompt's best candidate came from.

The groups have the columns ``orchestration.preferences.preference_table`` writes (the
responses, the pairs as indices with their margins) plus ``response_scores``. Unscorable
samples (null score) are left out; a prompt none of whose samples could be scored gives
nothing. Ties go to the earlier sample (the lower row).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa

from rollout import schema as S
from rollout.build import GeneratedSample, build_rollout_table


def _by_prompt(table: pa.Table) -> list[tuple[int, list[int], list[tuple], np.ndarray]]:
    """``(prompt_id, prompt tokens, responses, scores)`` per prompt in first-seen order, the
    unscorable samples left out."""
    ids = S.column_array(table, S.PROMPT_ID).to_pylist()
    prompts = S.column_array(table, S.PROMPT_TOKEN_IDS).to_pylist()
    responses = S.column_array(table, S.RESPONSE_TOKEN_IDS).to_pylist()
    scores = S.column_array(table, S.SCORE).to_pylist()
    groups: dict[int, tuple[list[int], list[tuple], list[float]]] = {}
    for pid, prompt, response, score in zip(ids, prompts, responses, scores, strict=True):
        if score is None:
            continue
        group = groups.setdefault(pid, (prompt, [], []))
        group[1].append(tuple(response))
        group[2].append(float(score))
    return [(pid, p, r, np.asarray(s)) for pid, (p, r, s) in groups.items()]


def group_table(groups: list[dict]) -> pa.Table:
    """Prompt groups (dicts of prompt_id, prompt, responses, chosen, rejected, scores and
    optionally best) as a table."""
    table = {
        S.PROMPT_ID: pa.array([g["prompt_id"] for g in groups], pa.int64()),
        S.PROMPT_TOKEN_IDS: pa.array([g["prompt"] for g in groups], S.TOKEN_IDS_TYPE),
        S.RESPONSES: pa.array(
            [[list(r) for r in g["responses"]] for g in groups], pa.list_(S.TOKEN_IDS_TYPE)
        ),
        S.PAIR_CHOSEN: pa.array([g["chosen"] for g in groups], pa.list_(pa.int32())),
        S.PAIR_REJECTED: pa.array([g["rejected"] for g in groups], pa.list_(pa.int32())),
        S.PAIR_MARGIN: pa.array([[0.0] * len(g["chosen"]) for g in groups], pa.list_(pa.float32())),
        S.RESPONSE_SCORES: pa.array([g["scores"] for g in groups], pa.list_(pa.float32())),
    }
    if groups and "best" in groups[0]:
        table[S.BEST_RESPONSE] = pa.array([g["best"] for g in groups], pa.int32())
    return pa.table(table)


def best_worst_pairs(table: pa.Table, min_gap: float = 0.0) -> tuple[pa.Table, dict[str, float]]:
    """Each prompt's highest- and lowest-scored samples as its pair, kept when the best scores
    more than ``min_gap`` above the worst and the two responses differ. Metrics:
    ``pairs/kept_fraction`` (of the prompts with a scored sample), ``pairs/score_gap`` (mean
    best minus worst over the kept pairs)."""
    groups, gaps = [], []
    prompts = _by_prompt(table)
    for pid, prompt, responses, scores in prompts:
        best, worst = int(np.argmax(scores)), int(np.argmin(scores))
        gap = float(scores[best] - scores[worst])
        if gap <= min_gap or responses[best] == responses[worst]:
            continue
        gaps.append(gap)
        groups.append(
            {
                "prompt_id": pid,
                "prompt": prompt,
                "responses": [responses[best], responses[worst]],
                "chosen": [0],
                "rejected": [1],
                "scores": [scores[best], scores[worst]],
            }
        )
    return group_table(groups), {
        "pairs/kept_fraction": len(groups) / max(len(prompts), 1),
        "pairs/score_gap": float(np.mean(gaps)) if gaps else 0.0,
    }


def ranked_groups(table: pa.Table) -> tuple[pa.Table, dict[str, float]]:
    """Each prompt's distinct candidates (a response sampled twice counts once, at its best
    score), every pair ``(i, j)`` with ``score_i > score_j``, and the best candidate. Metrics:
    ``rrhf/candidates`` (distinct per prompt), ``rrhf/pairs`` (per prompt), ``rrhf/best_score``
    (mean of each prompt's best)."""
    groups = []
    for pid, prompt, responses, scores in _by_prompt(table):
        distinct: dict[tuple, float] = {}
        for response, score in zip(responses, scores, strict=True):
            distinct[response] = max(score, distinct.get(response, -np.inf))
        cands, s = list(distinct), np.array(list(distinct.values()))
        chosen, rejected = np.nonzero(s[:, None] > s[None, :])
        groups.append(
            {
                "prompt_id": pid,
                "prompt": prompt,
                "responses": cands,
                "chosen": chosen.tolist(),
                "rejected": rejected.tolist(),
                "scores": s.tolist(),
                "best": int(np.argmax(s)),
            }
        )
    n = max(len(groups), 1)
    return group_table(groups), {
        "rrhf/candidates": sum(len(g["responses"]) for g in groups) / n,
        "rrhf/pairs": sum(len(g["chosen"]) for g in groups) / n,
        "rrhf/best_score": float(np.mean([max(g["scores"]) for g in groups])) if groups else 0.0,
    }


def best_of_n(table: pa.Table, threshold: float | None = None) -> tuple[pa.Table, dict]:
    """Each prompt's highest-scored sample (the earliest among equals) as a supervised row
    (``prompt_id``, ``prompt_token_ids``, ``response_token_ids``), kept when its score is at
    least ``threshold``. Metrics: ``rs/best_of_n`` (mean best score), ``rs/mean_score`` (mean
    over every scored sample), ``rs/kept_fraction`` (of the prompts with a scored sample)."""
    kept, best_scores, all_scores = [], [], []
    prompts = _by_prompt(table)
    for pid, prompt, responses, scores in prompts:
        best = int(np.argmax(scores))
        best_scores.append(scores[best])
        all_scores += scores.tolist()
        if threshold is None or scores[best] >= threshold:
            kept.append((pid, prompt, list(responses[best])))
    rows = pa.table(
        {
            S.PROMPT_ID: pa.array([k[0] for k in kept], pa.int64()),
            S.PROMPT_TOKEN_IDS: pa.array([k[1] for k in kept], S.TOKEN_IDS_TYPE),
            S.RESPONSE_TOKEN_IDS: pa.array([k[2] for k in kept], S.TOKEN_IDS_TYPE),
        }
    )
    return rows, {
        "rs/best_of_n": float(np.mean(best_scores)) if best_scores else 0.0,
        "rs/mean_score": float(np.mean(all_scores)) if all_scores else 0.0,
        "rs/kept_fraction": len(kept) / max(len(prompts), 1),
    }


def dataset_candidates(
    prompts: pa.Table, responses: Sequence[list[list[int]]], first_index: int, version: int
) -> pa.Table:
    """A rollout table of the dataset responses of ``prompts`` (a sampler batch:
    ``responses[dataset_row]`` are a prompt's), prompt-major, ``sample_index`` from
    ``first_index`` on, the prompts' passthrough columns copied and ``version`` stamped so they
    join the generated rows. Their ``rollout_logprobs`` are zeros: no generator sampled them,
    and nothing may read them as a policy's (RRHF recomputes every candidate's
    log-probability)."""
    pids = S.column_array(prompts, S.PROMPT_ID).to_pylist()
    tokens = S.column_array(prompts, S.PROMPT_TOKEN_IDS).to_pylist()
    rows = S.column_array(prompts, S.DATASET_ROW).to_pylist()
    samples, at = [], []
    for i, (pid, prompt, row) in enumerate(zip(pids, tokens, rows, strict=True)):
        for k, response in enumerate(responses[row]):
            zeros = [0.0] * len(response)
            samples.append(GeneratedSample(pid, first_index + k, prompt, response, zeros, "stop"))
            at.append(i)
    take = pa.array(at, pa.int64())
    passthrough = [c for c in prompts.column_names if c not in (S.PROMPT_ID, S.PROMPT_TOKEN_IDS)]
    metadata = {c: S.column_array(prompts, c).take(take) for c in passthrough}
    return build_rollout_table(samples, weight_version=version, metadata=metadata)


def best_sources(table: pa.Table, starts: dict[str, int]) -> dict[str, float]:
    """``rrhf/best_from_<source>``: the share of prompts (with a scored candidate) whose best
    one (the earliest among equals, as :func:`ranked_groups` picks) has a ``sample_index`` in
    the source's range; ``starts`` maps each source after the samples to its first index, in
    order."""
    ids = S.column_array(table, S.PROMPT_ID).to_pylist()
    index = S.column_array(table, S.SAMPLE_INDEX).to_pylist()
    scores = S.column_array(table, S.SCORE).to_pylist()
    best: dict[int, tuple[float, int]] = {}
    for pid, k, score in zip(ids, index, scores, strict=True):
        if score is not None and (pid not in best or score > best[pid][0]):
            best[pid] = (score, k)
    bounds = sorted(starts.items(), key=lambda kv: kv[1])
    counts = dict.fromkeys(starts, 0)
    for _, k in best.values():
        source = next((name for name, start in reversed(bounds) if k >= start), None)
        if source is not None:
            counts[source] += 1
    return {f"rrhf/best_from_{name}": n / max(len(best), 1) for name, n in counts.items()}


def flatten(groups: pa.Table) -> pa.Table:
    """Prompt groups -> one (prompt, response) row per response, group-major."""
    prompts = S.column_array(groups, S.PROMPT_TOKEN_IDS).to_pylist()
    responses = groups.column(S.RESPONSES).to_pylist()
    rows_p = [p for p, rs in zip(prompts, responses, strict=True) for _ in rs]
    rows_r = [r for rs in responses for r in rs]
    return pa.table(
        {
            S.PROMPT_ID: pa.array(np.arange(len(rows_r)), pa.int64()),
            S.PROMPT_TOKEN_IDS: pa.array(rows_p, S.TOKEN_IDS_TYPE),
            S.RESPONSE_TOKEN_IDS: pa.array(rows_r, S.TOKEN_IDS_TYPE),
        }
    )


def with_reference_logps(groups: pa.Table, logprobs: Callable[[pa.Table], pa.Table]) -> pa.Table:
    """``groups`` with ``ref_logps``: each response's summed log-probability under the
    reference, from ``logprobs`` (a flat table -> the same with ``ref_logprobs`` per token,
    as ``actors.reference.ReferenceModel.logprobs``)."""
    scored = logprobs(flatten(groups))
    per_row = [float(np.sum(x)) for x in S.column_array(scored, S.REF_LOGPROBS).to_pylist()]
    sizes = [len(r) for r in groups.column(S.RESPONSES).to_pylist()]
    bounds = np.cumsum([0, *sizes])
    sums = [per_row[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if S.REF_LOGPS in groups.column_names:
        groups = groups.drop_columns([S.REF_LOGPS])
    return groups.append_column(S.REF_LOGPS, pa.array(sums, pa.list_(pa.float32())))


def trim_to(table: pa.Table, parts: int) -> pa.Table:
    """The first rows of ``table`` that split evenly into ``parts`` (learner ranks x
    mini-batches); the rest wait for no one (they are this iteration's only)."""
    return table.slice(0, table.num_rows - table.num_rows % parts)
