"""The Arrow rollout contract: the one data format every Raylign role reads and writes, and
the statistics of a prompt's group of samples (``groups``).

Imports pyarrow, numpy and torch only, and no Raylign role.
"""

from rollout.build import GeneratedSample, build_rollout_table
from rollout.groups import GroupSpread, group_spread, zero_spread_fraction
from rollout.ops import (
    append_columns,
    concat,
    group_ids,
    iter_groups,
    read_parquet,
    split_by_tokens,
    split_rows,
    write_parquet,
)
from rollout.tensors import PaddedBatch, to_list_column, to_padded
from rollout.validate import RolloutValidationError, validate

__all__ = [
    "GeneratedSample",
    "GroupSpread",
    "PaddedBatch",
    "RolloutValidationError",
    "append_columns",
    "build_rollout_table",
    "concat",
    "group_ids",
    "group_spread",
    "iter_groups",
    "read_parquet",
    "split_by_tokens",
    "split_rows",
    "to_list_column",
    "to_padded",
    "validate",
    "write_parquet",
    "zero_spread_fraction",
]
