"""Weight sync: how the learner's weights reach the generators, one object per method.

Chosen once from ``weight_sync.method`` (:func:`weight_sync_for`); every method has the same
small interface, and nothing else in the run compares the method's name:

- :meth:`WeightSync.open` once the actors are up, :meth:`WeightSync.reopen` after a generator
  was restarted or the learner group rebuilt (a collective group lost a member);
- :meth:`WeightSync.push`: the learner's current weights to every generator as a version, its
  bytes returned;
- :meth:`WeightSync.restore`: the learner's weights, whole, to the given generators (a restarted
  replica, a resume, a rollback), through the object store whatever the method: the generators
  behind need not take part in a group;
- :meth:`WeightSync.sleep` / :meth:`WeightSync.wake`: with ``cluster.colocate=all`` the
  generators free their GPU memory while the learner trains.
"""

from __future__ import annotations

from orchestration import calls
from orchestration.placement import Actors


class WeightSync:
    """The object-store path, and what every method shares.

    Rank 0's state dict is put in Ray's object store once and read by every replica (the
    fallback: works between any devices, costs a copy through shared memory)."""

    name = "object_store"

    def __init__(
        self, actors: Actors, timeout: float, *, colocated: bool, tp: int, verify: bool = False
    ):
        self.actors, self.timeout = actors, timeout
        self.colocated, self.tp, self.verify = colocated, tp, verify

    def _wait(self, refs, stage: str):
        return calls.wait(refs, stage, self.timeout)

    def open(self) -> None:
        """Set up what pushes need (nothing for the object store)."""

    def reopen(self) -> None:
        """After a generator restart or a learner rebuild."""
        self.open()

    def sleep(self) -> None:
        if self.colocated:  # the learner and reference need the GPUs until the next sync
            self._wait([g.sleep.remote() for g in self.actors.generators], "sleep generators")

    def wake(self) -> None:
        if self.colocated:
            self._wait([g.wake_up.remote() for g in self.actors.generators], "wake generators")

    def push(self, version: int) -> float:
        """The learner's weights to every generator as ``version``; returns the bytes sent."""
        self.wake()
        served = self._send(version)
        if set(served) != {version}:
            raise RuntimeError(f"generators serve versions {served} after syncing {version}")
        return float(self.actors.sync_plan.num_bytes * self._copies())

    def _copies(self) -> int:
        return 1

    def _send(self, version: int) -> list[int]:
        return self.restore(version, self.actors.generators, stage="sync", reload=False)

    def restore(self, version: int, generators: list, stage: str = "resume sync", reload=True):
        """Rank 0's full state dict to ``generators`` as ``version`` (every rank takes part:
        under ZeRO-3 the parameters are gathered collectively). With ``reload`` a generator
        reloads even when it already serves ``version`` (versions may go back). Returns the
        versions they serve."""
        weights = [r.policy_arrays.remote() for r in self.actors.learners]
        refs = [
            g.update_weights.remote(version, weights[0], *([True] if reload else []))
            for g in generators
        ]
        served = self._wait(refs, f"{stage} (receive)")
        self._wait(weights[1:], f"{stage} (send)")
        return served


class CollectiveSync(WeightSync):
    """Learner rank 0 broadcasts buckets to every generator worker over a torch.distributed
    group of their own (gloo on CPU, NCCL on GPU); with ``verify``, the bytes are checksummed
    on both sides."""

    name = "collective"

    def open(self) -> None:
        """Learner rank 0 (root) and every generator worker join one weight-sync group."""
        actors, tp = self.actors, self.tp
        addr, port = self._wait(actors.learners[0].endpoint.remote(), "open sync group")
        world = 1 + len(actors.generators) * tp
        refs = [actors.learners[0].open_sync_group.remote(addr, port, world, self.timeout)]
        refs += [
            g.open_sync_group.remote(addr, port, 1 + i * tp, world, self.timeout)
            for i, g in enumerate(actors.generators)
        ]
        self._wait(refs, "open sync group")

    def _send(self, version: int) -> list[int]:
        plan, verify = self.actors.sync_plan, self.verify
        sends = [r.broadcast_weights.remote(plan, verify) for r in self.actors.learners]
        received = self._wait(
            [g.receive_weights.remote(version, plan, verify) for g in self.actors.generators],
            "sync (receive)",
        )
        _, digest = self._wait(sends, "sync (send)")[0]
        digests = {d for _, worker_digests in received for d in worker_digests}
        if verify and digests != {digest}:
            raise RuntimeError(
                f"weight sync {version}: checksums differ: sent {digest}, got {digests}"
            )
        return [v for v, _ in received]


class CudaIpcSync(WeightSync):
    """Learner rank i and generator i share GPU i: the generator maps the learner's packed
    buffers (CUDA IPC) and copies from them; no bytes cross a wire."""

    name = "cuda_ipc"

    def _copies(self) -> int:
        return len(self.actors.generators)

    def _send(self, version: int) -> list[int]:
        gens, learners, plan = self.actors.generators, self.actors.learners, self.actors.sync_plan
        handles = self._wait([r.share_ipc.remote(plan) for r in learners], "sync (share)")
        served = self._wait(
            [g.receive_ipc.remote(version, plan, h) for g, h in zip(gens, handles, strict=True)],
            "sync (receive)",
        )
        self._wait([r.release_ipc.remote() for r in learners], "sync (release)")
        return served


METHODS = {c.name: c for c in (WeightSync, CollectiveSync, CudaIpcSync)}


def weight_sync_for(cfg, actors: Actors) -> WeightSync:
    """The configured method's sync object over ``actors`` (not opened yet)."""
    return METHODS[cfg.weight_sync.method](
        actors,
        cfg.cluster.call_timeout_s,
        colocated=cfg.cluster.colocate == "all",
        tp=cfg.generator.tensor_parallel_size,
        verify=cfg.weight_sync.verify_checksum,
    )
