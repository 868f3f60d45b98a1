"""Builders: from what a generator produced to a rollout table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pyarrow as pa

from rollout import schema as S
from rollout.validate import validate


@dataclass(frozen=True)
class EpisodeRecord:
    """A multi-turn episode's own columns: ``loss_mask`` (one entry per response token, 1 on
    the model's), its model turns, tool calls, why it ended, the environment's summed reward,
    and a fault's detail (for the generator's log, not a column)."""

    loss_mask: Sequence[float]
    turns: int
    tool_calls: int
    end: str
    reward: float
    detail: str = ""


@dataclass(frozen=True)
class GeneratedSample:
    """One sampled response, as a generator backend reports it.

    ``rollout_logprobs[t]`` is the sampling policy's log-probability of ``response_token_ids[t]``;
    both have the same length.
    """

    prompt_id: int
    sample_index: int
    prompt_token_ids: Sequence[int]
    response_token_ids: Sequence[int]
    rollout_logprobs: Sequence[float]
    finish_reason: str
    # Partial rollouts: the weight version that sampled each response token (None: all of them
    # the table's ``weight_version``).
    token_versions: Sequence[int] | None = None
    episode: EpisodeRecord | None = None  # multi-turn episodes only


def build_rollout_table(
    samples: Sequence[GeneratedSample],
    *,
    weight_version: int,
    metadata: Mapping[str, Sequence | pa.Array] | None = None,
) -> pa.Table:
    """Make a validated rollout table with the generator columns from ``samples``.

    Args:
        samples: one entry per row, in row order.
        weight_version: the version of the weights that produced every sample (with
            ``token_versions``, its first token); samples that carry ``token_versions`` (all or
            none) add that column, and episodes (all or none) their columns.
        metadata: passthrough columns (``label`` and other prompt metadata), one value per sample,
            keyed by column name; names from the contract are refused.

    Raises:
        ValueError: a metadata column has the wrong length or a contract name.
        RolloutValidationError: the samples break the contract (the message names the row).
    """
    n = len(samples)
    arrays = [
        pa.array([s.prompt_id for s in samples], pa.int64()),
        pa.array([s.sample_index for s in samples], pa.int32()),
        pa.array([list(s.prompt_token_ids) for s in samples], S.TOKEN_IDS_TYPE),
        pa.array([list(s.response_token_ids) for s in samples], S.TOKEN_IDS_TYPE),
        pa.array([list(s.rollout_logprobs) for s in samples], S.PER_TOKEN_TYPE),
        pa.array([s.finish_reason for s in samples], pa.string()),
        pa.array([weight_version] * n, pa.int64()),
    ]
    table = pa.Table.from_arrays(arrays, schema=S.GENERATOR_SCHEMA)
    if n and samples[0].token_versions is not None:
        versions = pa.array([list(s.token_versions) for s in samples], pa.list_(pa.int64()))
        table = table.append_column(S.KNOWN_FIELDS[S.TOKEN_VERSIONS], versions)
    if n and samples[0].episode is not None:
        episodes = [s.episode for s in samples]
        for name, values in (
            (S.LOSS_MASK, [list(e.loss_mask) for e in episodes]),
            (S.TURNS, [e.turns for e in episodes]),
            (S.TOOL_CALLS, [e.tool_calls for e in episodes]),
            (S.EPISODE_END, [e.end for e in episodes]),
            (S.EPISODE_REWARD, [e.reward for e in episodes]),
        ):
            field = S.KNOWN_FIELDS[name]
            table = table.append_column(field, pa.array(values, field.type))
    for name, values in (metadata or {}).items():
        if S.expected_type(name) is not None:
            raise ValueError(f"metadata column '{name}' is a rollout-contract column; rename it")
        if len(values) != n:
            raise ValueError(f"metadata column '{name}' has {len(values)} values for {n} samples")
        table = table.append_column(
            name, values if isinstance(values, pa.Array) else pa.array(values)
        )
    return validate(table)
