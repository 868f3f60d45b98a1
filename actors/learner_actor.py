"""The learner rank as a Ray actor: a thin shell around ``learner.engine.Engine``.

Creating the actors and joining their process group are two steps, because rank 0 must first
say where it listens (its node's address and a free port) before any rank can connect.
"""

from __future__ import annotations

import socket

import pyarrow as pa
import torch

from learner import weight_sync
from learner.engine import Engine, LearnerSpec


class LearnerActor:
    """One learner rank. Call :meth:`endpoint` on rank 0, then :meth:`setup` on every rank
    concurrently (joining the process group is collective)."""

    def __init__(self, spec: LearnerSpec, rank: int, world_size: int):
        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.learner: Engine | None = None

    def endpoint(self) -> tuple[str, int]:
        """This node's address and a port free on it, for the process group's rendezvous."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the process group and build the DeepSpeed engines; returns this rank."""
        self.learner = Engine(
            self.spec,
            rank=self.rank,
            world_size=self.world_size,
            master_addr=master_addr,
            master_port=master_port,
        )
        return self.rank

    def compute_old(self, table: pa.Table) -> pa.Table:
        return self.learner.compute_old(table)

    def train(
        self,
        table: pa.Table,
        settings: dict[str, float] | None = None,
        ptx: pa.Table | None = None,
    ) -> dict[str, float]:
        return self.learner.train(table, settings, ptx)

    def evaluate(self, table: pa.Table) -> dict[str, float]:
        return self.learner.evaluate(table)

    def score(self, table: pa.Table) -> list[list[float]]:
        return self.learner.score(table)

    def shift_rm_bias(self, delta: float) -> float:
        return self.learner.shift_rm_bias(delta)

    def policy_weights(self) -> dict[str, torch.Tensor] | None:
        return self.learner.policy_weights()

    def policy_arrays(self) -> list | None:
        return self.learner.policy_arrays()

    def save_policy(self, path: str) -> None:
        self.learner.save_policy(path)

    def save_checkpoint(self, path: str) -> None:
        self.learner.save_checkpoint(path)

    def load_checkpoint(self, path: str) -> None:
        self.learner.load_checkpoint(path)

    def sync_plan(self, bucket_bytes: int) -> weight_sync.SyncPlan:
        return self.learner.sync_plan(bucket_bytes)

    def open_sync_group(self, host: str, port: int, world_size: int, timeout_s: float) -> None:
        self.learner.open_sync_group(host, port, world_size, timeout_s)

    def broadcast_weights(self, plan: weight_sync.SyncPlan, verify: bool = False):
        return self.learner.broadcast_weights(plan, verify)

    def share_ipc(self, plan: weight_sync.SyncPlan) -> list:
        return self.learner.share_ipc(plan)

    def release_ipc(self) -> None:
        self.learner.release_ipc()
