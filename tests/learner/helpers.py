"""Pieces the learner tests share: the tables the supervised and preference objectives train on,
the reference loss they must match, and the engine on one gloo rank."""

from __future__ import annotations

import pyarrow as pa
import torch

from learner.engine import Engine, LearnerSpec, OptimizerSpec
from rollout import schema as S
from tests.helpers import free_port


def sft_table(rows: list[tuple[list[int], list[int], list[float]]], first_id: int = 0) -> pa.Table:
    fields = [S.KNOWN_FIELDS[k] for k in (S.PROMPT_ID, S.PROMPT_TOKEN_IDS, S.RESPONSE_TOKEN_IDS)]
    fields.append(S.KNOWN_FIELDS[S.SFT_MASK])
    columns = [
        list(range(first_id, first_id + len(rows))),
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
    ]
    arrays = [pa.array(c, f.type) for c, f in zip(columns, fields, strict=True)]
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def group_table(groups: list[tuple[list[int], list[list[int]], list[tuple[int, int, float]]]]):
    return pa.table(
        {
            S.PROMPT_ID: pa.array(range(len(groups)), pa.int64()),
            S.PROMPT_TOKEN_IDS: pa.array([g[0] for g in groups], S.TOKEN_IDS_TYPE),
            S.RESPONSES: pa.array([g[1] for g in groups], pa.list_(S.TOKEN_IDS_TYPE)),
            S.PAIR_CHOSEN: pa.array([[p[0] for p in g[2]] for g in groups], pa.list_(pa.int32())),
            S.PAIR_REJECTED: pa.array([[p[1] for p in g[2]] for g in groups], pa.list_(pa.int32())),
            S.PAIR_MARGIN: pa.array([[p[2] for p in g[2]] for g in groups], pa.list_(pa.float32())),
        }
    )


def full_forward_nll(model, rows) -> tuple[float, int]:
    """The masked next-token NLL summed over ``rows``, each alone through the model's own
    forward (no padding, no packing): the reference the objective must match."""
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, response, mask in rows:
            ids = torch.tensor([prompt + response])
            logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
            for t, (token, keep) in enumerate(zip(response, mask, strict=True)):
                if keep > 0.5:
                    total -= logp[len(prompt) - 1 + t, token].item()
                    count += 1
    return total, count


def engine(model_path: str, objective, **kwargs) -> Engine:
    """The learner engine on one gloo rank (real DeepSpeed, no Ray) training ``objective``;
    ``lr`` and ``micro_batch_tokens`` default to 1e-2 and 4096, other keywords go to the spec."""
    spec = LearnerSpec(
        model_path=model_path,
        policy_optim=OptimizerSpec(lr=kwargs.pop("lr", 1e-2)),
        objective=objective,
        micro_batch_tokens=kwargs.pop("micro_batch_tokens", 4096),
        **kwargs,
    )
    return Engine(spec, rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port())
