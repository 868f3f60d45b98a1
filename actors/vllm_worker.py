"""Methods added to every vLLM worker (``worker_extension_cls``) to take weights from the learner.

vLLM mixes this class into its worker class in each worker process, and
``LLM.collective_rpc("<method>")`` calls a method on every worker (every tensor-parallel rank),
so the tensors land in the process that owns the model, whatever the executor. Keep it free of
module-level state and of imports vLLM would not find in a worker.

Two ways in, besides the object store (``reload_weights`` with tensors passed in the call):

- ``raylign_receive``: the collective group of ``learner.weight_sync`` (gloo on CPU, NCCL on GPU).
- ``raylign_receive_ipc``: CUDA IPC handles of buffers that a learner on the same GPU packed;
  the buffers are rebuilt here without a copy through host memory (GPU only).
"""

from __future__ import annotations

import torch

from learner import weight_sync


class WeightSyncWorker:
    """Mixed into vLLM's worker: ``self`` is the worker (``self.rank``, ``self.device``,
    ``self.reload_weights``)."""

    def raylign_open_sync_group(
        self, host: str, port: int, rank_offset: int, world_size: int, timeout_s: float
    ) -> int:
        """Join the learner's weight-sync group as rank ``rank_offset + <this worker's rank>``."""
        rank = rank_offset + self.rank
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self._raylign_group = weight_sync.open_group(
            host, port, rank, world_size, device=device, timeout_s=timeout_s
        )
        return rank

    def raylign_receive(self, plan: weight_sync.SyncPlan, verify: bool) -> str | None:
        """Receive one sync from the group and load it as it arrives (one bucket in memory at a
        time); returns the checksum of what arrived when ``verify``."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        checksum = weight_sync.Checksum() if verify else None
        stream = weight_sync.receive(self._raylign_group, plan, device, checksum)
        self.reload_weights(weights_iterator=stream)
        return checksum.hexdigest() if checksum else None

    def raylign_receive_ipc(self, plan: weight_sync.SyncPlan, handles: list) -> None:
        """Load buffers shared by a colocated learner: ``handles[i]`` is
        ``torch.multiprocessing.reductions.reduce_tensor`` of bucket ``i``'s packed buffer."""
        device_index = torch.cuda.current_device()

        def stream():
            for bucket, (rebuild, args) in zip(plan.buckets, handles, strict=True):
                args = list(args)
                args[6] = device_index  # the same GPU, under this process's device numbering
                yield from weight_sync.unpack(bucket, rebuild(*args))

        self.reload_weights(weights_iterator=stream())
        torch.cuda.synchronize()
