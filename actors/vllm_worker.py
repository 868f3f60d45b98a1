"""Methods added to every vLLM worker (``worker_extension_cls``) to take weights from the learner.

vLLM mixes this class into its worker class in each worker process, and
``LLM.collective_rpc("<method>")`` calls a method on every worker (every tensor-parallel rank),
so the tensors land in the process that owns the model, whatever the executor. Keep it free of
module-level state and of imports vLLM would not find in a worker.

Three ways in, all through :meth:`WeightSyncWorker._raylign_reload`:

- ``raylign_load``: tensors passed in the call (the object store; resume and recovery pushes);
- ``raylign_receive``: the collective group of ``learner.weight_sync`` (gloo on CPU, NCCL on GPU);
- ``raylign_receive_ipc``: CUDA IPC handles of buffers that a learner on the same GPU packed;
  the buffers are rebuilt here without a copy through host memory (GPU only).

**Tied embeddings.** vLLM ties a model's output head to its input embedding by sharing one
parameter between two modules. ``reload_weights`` refreshes the embedding module (the one the
checkpoint names) but not the head, and on CPU the head computes with a prepacked copy of the
weight made when it was last processed: after a reload the shared parameter holds the new
weights while the logits still come from the old ones. After each reload every module that
shares a parameter with another and got none of its weights by name is processed again
(:func:`refresh_shared`), and the kernels that can go stale are checked (:func:`stale_modules`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from learner import weight_sync


class WeightSyncWorker:
    """Mixed into vLLM's worker: ``self`` is the worker (``self.rank``, ``self.device``,
    ``self.reload_weights``, ``self.model_runner``)."""

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

    def raylign_load(self, weights: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        """Load ``weights`` (Hugging Face names, full tensors) passed in the call; returns the
        modules whose kernels disagree with their weights afterwards (see :func:`stale_modules`),
        which should be none."""
        return self._raylign_reload(weights)

    def raylign_receive(
        self, plan: weight_sync.SyncPlan, verify: bool
    ) -> tuple[str | None, list[str]]:
        """Receive one sync from the group and load it as it arrives (one bucket in memory at a
        time). Returns the checksum of what arrived (with ``verify``, else None) and the modules
        whose kernels disagree with their weights."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        checksum = weight_sync.Checksum() if verify else None
        stream = weight_sync.receive(self._raylign_group, plan, device, checksum)
        stale = self._raylign_reload(stream)
        return (checksum.hexdigest() if checksum else None), stale

    def raylign_receive_ipc(self, plan: weight_sync.SyncPlan, handles: list) -> list[str]:
        """Load buffers shared by a colocated learner: ``handles[i]`` is
        ``torch.multiprocessing.reductions.reduce_tensor`` of bucket ``i``'s packed buffer."""
        device_index = torch.cuda.current_device()

        def stream():
            for bucket, (rebuild, args) in zip(plan.buckets, handles, strict=True):
                args = list(args)
                args[6] = device_index  # the same GPU, under this process's device numbering
                yield from weight_sync.unpack(bucket, rebuild(*args))

        stale = self._raylign_reload(stream())
        torch.cuda.synchronize()
        return stale

    def _raylign_reload(self, weights: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        loaded: set[str] = set()  # the checkpoint names the reload got, hence processed

        def named():
            for name, tensor in weights:
                loaded.add(name)
                yield name, tensor

        self.reload_weights(weights_iterator=named())
        model = self.model_runner.get_model()
        tied = shared_modules(model)
        refresh_shared(tied, loaded)
        return stale_modules(model, tied)


def _processable(module: nn.Module):
    """The module's unquantized weight method, if it has one to run again. A quantized method
    would quantize an already quantized weight a second time, so those are left alone (the
    e2e log-probability check would show them stale)."""
    method = getattr(module, "quant_method", None)
    if method is None or not type(method).__name__.startswith("Unquantized"):
        return None
    return method if hasattr(method, "process_weights_after_loading") else None


def shared_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules holding a parameter that another module holds too (a tied output head and its
    embedding), by name."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append((name, module))
    return {name: m for group in owners.values() if len(group) > 1 for name, m in group}


def refresh_shared(tied: dict[str, nn.Module], loaded: set[str]) -> list[str]:
    """Process again each tied module the reload did not (none of its parameters' names was
    among the ``loaded`` ones), so kernels derived from the weight (the CPU backend's prepacked
    GEMM weights) follow the new values. Returns the modules processed."""
    refreshed = []
    for name, module in tied.items():
        method = _processable(module)
        names = {f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)}
        if method is not None and not names & loaded:
            method.process_weights_after_loading(module)
            refreshed.append(name)
    return refreshed


@torch.no_grad()
def stale_modules(model: nn.Module, tied: dict[str, nn.Module]) -> list[str]:
    """Modules whose kernel does not compute with their weight. Checked: the tied modules, and
    every module that keeps its weight beside a prepacked CPU kernel (``cpu_linear``: output
    heads and embeddings; linear layers hand their weight to the kernel and keep none). For each,
    ``quant_method.apply`` on a fixed two-row probe is compared with ``F.linear`` of the weight,
    relative to the output's largest entry (1e-5 in fp32: a stale copy is 1e-4 off after a 1e-5
    update per element; 1e-2 in 16-bit). Costs two rows of each checked module's GEMM."""
    candidates = dict(tied)
    candidates |= {n: m for n, m in model.named_modules() if hasattr(m, "cpu_linear")}
    stale = []
    generator = torch.Generator().manual_seed(0)
    for name, module in candidates.items():
        method = _processable(module)
        weight = getattr(module, "weight", None)
        if method is None or not hasattr(method, "apply") or not isinstance(weight, torch.Tensor):
            continue
        if weight.dim() != 2 or weight.numel() == 0 or weight.is_meta:
            continue
        probe = torch.randn(2, weight.shape[1], generator=generator).to(weight)
        expected = nn.functional.linear(probe, weight).float()
        got = method.apply(module, probe).float()
        rtol = 1e-5 if weight.dtype == torch.float32 else 1e-2
        scale = expected.abs().max().clamp_min(1e-6)
        if got.shape != expected.shape or (got - expected).abs().max() > rtol * scale:
            stale.append(name)
    return stale
