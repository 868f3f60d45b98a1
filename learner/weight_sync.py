"""Collective weight sync: learner rank 0 broadcasts the policy, bucket by bucket, to every
generator worker over a process group of its own (gloo on CPU, NCCL on GPU).

The group is not the learner's DeepSpeed group and not vLLM's: it is a standalone
``ProcessGroupGloo`` / ``ProcessGroupNCCL`` on its own ``TCPStore``, so it joins processes that
each already have a default group. Rank 0 is the learner's rank 0 (it hosts the store); ranks
1..N are the generator workers (every tensor-parallel worker of every replica: each loads its own
shard from the full tensors).

Both sides agree on a :class:`SyncPlan` once, when the group is opened: parameter names, shapes
and dtypes, cut into buckets of at most ``bucket_bytes`` (a larger tensor gets a bucket of its
own). A sync is then one broadcast per bucket, never one call per parameter. The sender packs
the next bucket while the current one is on the wire, and a receiver loads one bucket into its
model while the next arrives.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16)}


# ------------------------------------------------------------------ through the object store

HostArrays = list[tuple[str, str, np.ndarray]]
"""The policy as ``(name, torch dtype, array)`` for Ray's object store."""


def to_host_arrays(weights: Mapping[str, torch.Tensor]) -> HostArrays:
    """``weights`` (CPU tensors) as numpy arrays, which Ray stores out of band: a reader on the
    same node gets views of the shared memory, not copies (a dict of tensors would be pickled and
    copied again on the way out). 16-bit floats travel as their raw 16-bit words. The arrays
    share memory with the tensors: Ray copies them once, when they are put."""
    out = []
    for name, t in weights.items():
        t = t.detach()
        raw = t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t
        out.append((name, str(t.dtype), raw.numpy()))
    return out


def from_host_arrays(arrays: HostArrays) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of :func:`to_host_arrays`, as views of its arrays (read-only memory: read
    them, do not write)."""
    import warnings

    for name, dtype, array in arrays:
        with warnings.catch_warnings():  # Ray's arrays are read-only; nothing writes to them
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(array)
        yield name, t.view(_DTYPES[dtype]) if t.dtype != _DTYPES[dtype] else t


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "torch.float32", ...

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Bucket:
    """Tensors sent as one flat buffer of ``numel`` elements of ``dtype``."""

    tensors: tuple[TensorMeta, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)


@dataclass(frozen=True)
class SyncPlan:
    buckets: tuple[Bucket, ...]

    @property
    def num_bytes(self) -> int:
        return sum(b.numel * _DTYPES[b.dtype].itemsize for b in self.buckets)


def describe(tensors: Mapping[str, torch.Tensor]) -> list[TensorMeta]:
    """Names, full shapes and dtypes (a ZeRO-3 partitioned parameter reports its full shape)."""
    return [
        TensorMeta(name, tuple(getattr(t, "ds_shape", t.shape)), str(t.dtype))
        for name, t in tensors.items()
    ]


def plan_buckets(metas: Iterable[TensorMeta], bucket_bytes: int) -> SyncPlan:
    """Cut the tensors (in order) into same-dtype buckets of at most ``bucket_bytes``."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    buckets: list[Bucket] = []
    current: list[TensorMeta] = []
    size = 0
    for meta in metas:
        nbytes = meta.numel * _DTYPES[meta.dtype].itemsize
        if current and (size + nbytes > bucket_bytes or current[0].dtype != meta.dtype):
            buckets.append(Bucket(tuple(current), current[0].dtype))
            current, size = [], 0
        current.append(meta)
        size += nbytes
    if current:
        buckets.append(Bucket(tuple(current), current[0].dtype))
    return SyncPlan(tuple(buckets))


@dataclass
class SyncGroup:
    """A standalone process group and the store it rendezvoused through (which must outlive it)."""

    pg: dist.ProcessGroup
    store: dist.Store

    def broadcast(self, buffer: torch.Tensor):
        """Asynchronous broadcast from rank 0 into ``buffer``; returns the work to wait on."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        return self.pg.broadcast([buffer], opts)


def open_group(
    host: str, port: int, rank: int, world_size: int, *, device: str, timeout_s: float
) -> SyncGroup:
    """Join the sync group; rank 0 hosts its store at ``host:port``. Blocks until all joined."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
    if device.startswith("cuda"):
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg = dist.ProcessGroupNCCL(store, rank, world_size, opts)
    else:
        pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
    return SyncGroup(pg, store)


class Checksum:
    """BLAKE2b over the bytes of every bucket, in order: equal digests, bit-identical weights."""

    def __init__(self):
        self._h = hashlib.blake2b(digest_size=16)

    def update(self, buffer: torch.Tensor) -> None:
        flat = buffer.detach().cpu().contiguous().view(torch.uint8)
        self._h.update(flat.numpy().tobytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


class SendBuffers:
    """The sender's two flat buffers, reused bucket after bucket and sync after sync: bucket
    ``i`` is packed into buffer ``i % 2`` while the other is on the wire (:func:`send` waits for a
    buffer's broadcast before it is packed again). Fresh memory for every bucket would cost page
    faults on every sync."""

    def __init__(self, plan: SyncPlan, device: str):
        sizes = [b.numel * _DTYPES[b.dtype].itemsize for b in plan.buckets] or [0]
        count = min(2, len(plan.buckets)) or 1
        self._raw = [
            torch.empty(max(sizes), dtype=torch.uint8, device=device) for _ in range(count)
        ]

    def get(self, index: int, bucket: Bucket) -> torch.Tensor:
        dtype = _DTYPES[bucket.dtype]
        raw = self._raw[index % len(self._raw)]
        return raw[: bucket.numel * dtype.itemsize].view(dtype)


def pack(
    bucket: Bucket,
    tensors: Mapping[str, torch.Tensor],
    device: str,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The bucket's tensors as one flat buffer on ``device`` (into ``out`` when given)."""
    if out is None:
        out = torch.empty(bucket.numel, dtype=_DTYPES[bucket.dtype], device=device)
    offset = 0
    for meta in bucket.tensors:
        out[offset : offset + meta.numel].copy_(tensors[meta.name].reshape(-1))
        offset += meta.numel
    return out


def unpack(bucket: Bucket, buffer: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Views of ``buffer`` under the bucket's names and shapes (no copy)."""
    offset = 0
    for meta in bucket.tensors:
        yield meta.name, buffer[offset : offset + meta.numel].view(meta.shape)
        offset += meta.numel


def send(
    group: SyncGroup,
    buckets: Iterator[torch.Tensor],
    checksum: Checksum | None = None,
) -> int:
    """Broadcast each packed bucket from rank 0; packing the next overlaps sending the current.
    Returns the bytes sent."""
    sent, pending = 0, None  # pending: (work, buffer); the buffer must live until the work ends
    for buffer in buckets:
        work = group.broadcast(buffer)
        if pending is not None:
            pending[0].wait()
        if checksum is not None:
            checksum.update(buffer)
        pending = (work, buffer)
        sent += buffer.numel() * buffer.element_size()
    if pending is not None:
        pending[0].wait()
    return sent


def receive(
    group: SyncGroup, plan: SyncPlan, device: str, checksum: Checksum | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Receive the plan's buckets from rank 0, yielding (name, tensor) as each bucket lands.
    The next bucket's broadcast is posted before the current one's tensors are handed out, so
    the consumer's loading overlaps the transfer; two buckets are in memory at most."""

    def post(bucket: Bucket):
        buffer = torch.empty(bucket.numel, dtype=_DTYPES[bucket.dtype], device=device)
        return buffer, group.broadcast(buffer)

    pending = post(plan.buckets[0]) if plan.buckets else None
    for i, bucket in enumerate(plan.buckets):
        buffer, work = pending
        work.wait()
        pending = post(plan.buckets[i + 1]) if i + 1 < len(plan.buckets) else None
        if checksum is not None:
            checksum.update(buffer)
        yield from unpack(bucket, buffer)


class PolicySender:
    """The learner's side of weight sync, on one rank: the bucket plan of its policy, the
    collective group (rank 0 is its root), and the packed buckets for broadcast or CUDA IPC.
    Under ZeRO-3 each bucket's parameters are gathered collectively, so every rank takes part in
    every send."""

    def __init__(self, module: torch.nn.Module, rank: int, zero_stage: int, device: str):
        self.module, self.rank, self.zero_stage, self.device = module, rank, zero_stage, device
        self._group: SyncGroup | None = None  # rank 0 only
        self._buffers, self._buffers_plan = None, None  # rank 0: reused packing buffers
        self._ipc_buffers: list | None = None

    def plan(self, bucket_bytes: int) -> SyncPlan:
        """The bucket layout every sync uses (parameters only; tied weights appear once)."""
        return plan_buckets(describe(dict(self.module.named_parameters())), bucket_bytes)

    def open_group(self, host: str, port: int, world_size: int, timeout_s: float) -> None:
        """Rank 0 joins the sync group as its root (and hosts its store at ``host:port``)."""
        if self.rank != 0:
            raise RuntimeError("only learner rank 0 joins the weight-sync group")
        self._group = open_group(host, port, 0, world_size, device=self.device, timeout_s=timeout_s)

    def broadcast(self, plan: SyncPlan, verify: bool = False) -> tuple[int, str | None]:
        """Send the policy to the sync group, bucket by bucket; every rank calls it, rank 0
        sends. Returns the bytes sent and, with ``verify``, their checksum (rank 0;
        ``(0, None)`` elsewhere)."""
        buffers = self._packed(plan)
        if self.rank != 0:
            for _ in buffers:  # take part in the ZeRO-3 gathers
                pass
            return 0, None
        if self._group is None:
            raise RuntimeError("broadcast_weights before open_sync_group")
        checksum = Checksum() if verify else None
        sent = send(self._group, buffers, checksum)
        return sent, checksum.hexdigest() if checksum else None

    def share_ipc(self, plan: SyncPlan) -> list:
        """Pack the policy into GPU buffers and return their CUDA IPC handles, for the generator
        on this rank's GPU (full colocation: every rank serves its own). The buffers live until
        :meth:`release_ipc`. Costs one copy of the policy in GPU memory while shared."""
        from torch.multiprocessing.reductions import reduce_tensor

        if self.device == "cpu":
            raise RuntimeError("CUDA IPC weight sync needs GPUs; use weight_sync.method=collective")
        self._ipc_buffers = list(self._packed(plan, every_rank=True))
        torch.cuda.synchronize()
        return [reduce_tensor(b) for b in self._ipc_buffers]

    def release_ipc(self) -> None:
        self._ipc_buffers = None
        torch.cuda.empty_cache()

    @torch.no_grad()
    def _packed(self, plan: SyncPlan, every_rank: bool = False):
        """Each bucket packed (on rank 0, or on every rank for IPC), gathered first under
        ZeRO-3. The broadcast path reuses two send buffers; IPC needs every bucket at once."""
        params = dict(self.module.named_parameters())
        packs = every_rank or self.rank == 0
        reuse = packs and not every_rank
        if reuse and self._buffers_plan != plan:
            self._buffers = SendBuffers(plan, self.device)
            self._buffers_plan = plan

        def packed(i: int, bucket: Bucket):
            if not packs:
                return None
            out = self._buffers.get(i, bucket) if reuse else None
            return pack(bucket, params, self.device, out=out)

        for i, bucket in enumerate(plan.buckets):
            if self.zero_stage == 3:
                import deepspeed

                group = [params[m.name] for m in bucket.tensors]
                with deepspeed.zero.GatheredParameters(group):
                    yield packed(i, bucket)
            else:
                yield packed(i, bucket)
