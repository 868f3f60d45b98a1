"""The rollout table's columns and their Arrow types, in one place.

One ``pyarrow.Table`` per batch, one row per sample, variable-length lists instead of padding
(the README's "The rollout contract"). Each stage appends columns; none rewrites one.

Who writes what:

=========================  ====================  =========================================
column                     type                  written by
=========================  ====================  =========================================
prompt_id                  int64                 generator (group key for GRPO / RLOO)
sample_index               int32                 generator (0..n-1 within a prompt)
prompt_token_ids           list<int32>           generator
response_token_ids         list<int32>           generator
rollout_logprobs           list<float32>         generator (vLLM's logprob per sampled token)
finish_reason              string                generator: "stop", "length" or "abort"
weight_version             int64                 generator (weights that produced the sample;
                                                 with partial rollouts, its first token)
token_versions             list<int64>           generator, partial rollouts only: the weight
                                                 version that sampled each response token
loss_mask                  list<float32>         generator, multi-turn episodes only: 1 on the
                                                 model's tokens, 0 on observation tokens
turns, tool_calls          int32                 generator, episodes: model turns, tool calls
episode_end                string                generator, episodes: why the episode ended
episode_reward             float32               generator, episodes: the environment's rewards
score, per-reward columns  float32 (nullable)    reward service; null = unscorable
ref_logprobs               list<float32>         reference model
old_logprobs, values       list<float32>         learner
advantages, returns        list<float32>         driver (learner.algorithms)
sft_mask                   list<float32>         supervised data (orchestration.sft_data)
=========================  ====================  =========================================

Any other column (``label`` and prompt metadata) passes through untouched.
"""

from __future__ import annotations

import pyarrow as pa

# --- column names -------------------------------------------------------------------------
PROMPT_ID = "prompt_id"
SAMPLE_INDEX = "sample_index"
PROMPT_TOKEN_IDS = "prompt_token_ids"
RESPONSE_TOKEN_IDS = "response_token_ids"
ROLLOUT_LOGPROBS = "rollout_logprobs"
FINISH_REASON = "finish_reason"
WEIGHT_VERSION = "weight_version"
# Partial rollouts (``max_staleness > 0``, ``partial_rollouts: continue``): a generation that a
# weight update reaches mid-way goes on with the new weights; each token's version is kept.
TOKEN_VERSIONS = "token_versions"
# Multi-turn episodes (``actors.episodes``): the response is every turn after the prompt, the
# model's and the environment's (tool results, feedback), kept as token ids end to end.
LOSS_MASK = "loss_mask"  # 1.0 on the model's tokens, 0.0 on observation tokens (not sampled)
TURNS = "turns"  # the model's turns in the episode
TOOL_CALLS = "tool_calls"  # tool calls the environment ran (well-formed or not)
EPISODE_END = "episode_end"  # why it ended: "done", "max_turns", "max_tokens", "<tool>:<fault>"
EPISODE_REWARD = "episode_reward"  # the sum of the environment's per-turn and final rewards
SCORE = "score"
REF_LOGPROBS = "ref_logprobs"
OLD_LOGPROBS = "old_logprobs"
VALUES = "values"
ADVANTAGES = "advantages"
RETURNS = "returns"
SFT_MASK = "sft_mask"  # 1.0: the response token is in the supervised loss; 0.0: not
DATASET_ROW = "dataset_row"  # passthrough: the dataset row (prompt, example) a row came from

# Prompt groups (reward-model training: ``orchestration.preferences``, ``learner.supervised``),
# one row per prompt: its distinct responses and the pairs ranked among them.
RESPONSES = "responses"  # list<list<int32>>: the group's distinct responses
PAIR_CHOSEN = "pair_chosen"  # list<int32>: per pair, the index of the better response
PAIR_REJECTED = "pair_rejected"  # list<int32>: per pair, the index of the worse response
PAIR_MARGIN = "pair_margin"  # list<float32>: per pair, the margin m of -log sigmoid(r_w - r_l - m)
# Preference methods on prompt groups (``learner.preference``): DPO reads the reference's
# summed log-probability of each response, RRHF the best response (its cross-entropy term).
REF_LOGPS = "ref_logps"  # list<float32>: per response, sum_t log pi_ref(y_t | x, y_<t)
BEST_RESPONSE = "best_response"  # int32: the index of the group's highest-scored response
RESPONSE_SCORES = "response_scores"  # list<float32>: per response, its score (when known)

FINISH_REASONS = ("stop", "length", "abort")
"""Allowed ``finish_reason`` values; only ``abort`` may come with an empty response."""

TOKEN_IDS_TYPE = pa.list_(pa.int32())
PER_TOKEN_TYPE = pa.list_(pa.float32())

GENERATOR_FIELDS: tuple[pa.Field, ...] = (
    pa.field(PROMPT_ID, pa.int64(), nullable=False),
    pa.field(SAMPLE_INDEX, pa.int32(), nullable=False),
    pa.field(PROMPT_TOKEN_IDS, TOKEN_IDS_TYPE, nullable=False),
    pa.field(RESPONSE_TOKEN_IDS, TOKEN_IDS_TYPE, nullable=False),
    pa.field(ROLLOUT_LOGPROBS, PER_TOKEN_TYPE, nullable=False),
    pa.field(FINISH_REASON, pa.string(), nullable=False),
    pa.field(WEIGHT_VERSION, pa.int64(), nullable=False),
)
"""Columns every rollout table has, as the generator writes them."""

GENERATOR_SCHEMA = pa.schema(GENERATOR_FIELDS)

PER_TOKEN_COLUMNS: tuple[str, ...] = (
    ROLLOUT_LOGPROBS,
    REF_LOGPROBS,
    OLD_LOGPROBS,
    VALUES,
    ADVANTAGES,
    RETURNS,
    SFT_MASK,
    LOSS_MASK,
)
"""list<float32> columns with exactly one entry per response token."""

STAGE_FIELDS: dict[str, pa.Field] = {
    TOKEN_VERSIONS: pa.field(TOKEN_VERSIONS, pa.list_(pa.int64()), nullable=False),
    LOSS_MASK: pa.field(LOSS_MASK, PER_TOKEN_TYPE, nullable=False),
    TURNS: pa.field(TURNS, pa.int32(), nullable=False),
    TOOL_CALLS: pa.field(TOOL_CALLS, pa.int32(), nullable=False),
    EPISODE_END: pa.field(EPISODE_END, pa.string(), nullable=False),
    EPISODE_REWARD: pa.field(EPISODE_REWARD, pa.float32(), nullable=False),
    SCORE: pa.field(SCORE, pa.float32(), nullable=True),
    REF_LOGPROBS: pa.field(REF_LOGPROBS, PER_TOKEN_TYPE, nullable=False),
    OLD_LOGPROBS: pa.field(OLD_LOGPROBS, PER_TOKEN_TYPE, nullable=False),
    VALUES: pa.field(VALUES, PER_TOKEN_TYPE, nullable=False),
    ADVANTAGES: pa.field(ADVANTAGES, PER_TOKEN_TYPE, nullable=False),
    RETURNS: pa.field(RETURNS, PER_TOKEN_TYPE, nullable=False),
    SFT_MASK: pa.field(SFT_MASK, PER_TOKEN_TYPE, nullable=False),
}
"""Optional columns (the generator's ``token_versions`` and episode columns) and columns that
later stages append, with their types. Reward columns other than ``score`` (one per reward
function) are float32 and nullable too; see :func:`expected_type`."""

KNOWN_FIELDS: dict[str, pa.Field] = {f.name: f for f in GENERATOR_FIELDS} | STAGE_FIELDS

REWARD_COLUMN_PREFIX = "reward/"
"""Per-reward-function score columns are named ``reward/<function name>`` (float32, nullable)."""


def expected_type(name: str) -> pa.DataType | None:
    """The Arrow type the contract fixes for column ``name``, or None for passthrough columns."""
    if name in KNOWN_FIELDS:
        return KNOWN_FIELDS[name].type
    if name.startswith(REWARD_COLUMN_PREFIX):
        return pa.float32()
    return None


def column_array(table: pa.Table, name: str) -> pa.Array:
    """Column ``name`` of ``table`` as one contiguous array (chunks combined)."""
    return table.column(name).combine_chunks()
