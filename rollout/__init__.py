"""The Arrow rollout contract: the one data format every Raylign role reads and writes.

Imports pyarrow, numpy and torch only, and no Raylign role.
"""

from rollout.build import GeneratedSample, build_rollout_table
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
    "PaddedBatch",
    "RolloutValidationError",
    "append_columns",
    "build_rollout_table",
    "concat",
    "group_ids",
    "iter_groups",
    "read_parquet",
    "split_by_tokens",
    "split_rows",
    "to_list_column",
    "to_padded",
    "validate",
    "write_parquet",
]
