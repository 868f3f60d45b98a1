"""The collective weight-sync wire format: bucket plans, packing, and a real gloo broadcast from
one sender to two receivers (three ranks in threads of this process)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from learner import weight_sync as W
from tests.helpers import free_port

pytestmark = pytest.mark.unit  # pure code in this process


def weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(10, 4, generator=g),  # 160 bytes
        "layer.q.weight": torch.randn(4, 4, generator=g),  # 64 bytes
        "layer.q.bias": torch.randn(4, generator=g),  # 16 bytes
        "norm.weight": torch.randn(4, generator=g).to(torch.bfloat16),  # 8 bytes
        "head.weight": torch.randn(3, 4, generator=g),  # 48 bytes
    }


def test_buckets_respect_the_size_cap_and_dtype_and_keep_order():
    plan = W.plan_buckets(W.describe(weights()), bucket_bytes=100)
    names = [[m.name for m in b.tensors] for b in plan.buckets]
    # embed (160 B) alone exceeds the cap: a bucket of its own; q.weight + q.bias = 80 B fit;
    # norm is bf16: new bucket; head is fp32 again: new bucket.
    assert names == [
        ["embed.weight"],
        ["layer.q.weight", "layer.q.bias"],
        ["norm.weight"],
        ["head.weight"],
    ]
    assert plan.num_bytes == 160 + 64 + 16 + 8 + 48
    with pytest.raises(ValueError, match="bucket_bytes"):
        W.plan_buckets(W.describe(weights()), 0)


def test_pack_then_unpack_gives_back_every_tensor_exactly():
    w = weights()
    plan = W.plan_buckets(W.describe(w), bucket_bytes=1 << 20)
    out = {}
    for bucket in plan.buckets:
        out |= dict(W.unpack(bucket, W.pack(bucket, w, "cpu")))
    assert out.keys() == w.keys()
    for name, t in w.items():
        assert out[name].dtype == t.dtype and torch.equal(out[name], t)


def test_a_gloo_broadcast_delivers_identical_bytes_to_every_receiver():
    w = weights()
    plan = W.plan_buckets(W.describe(w), bucket_bytes=100)
    port, world = free_port(), 3
    results: dict[int, tuple] = {}

    def run(rank: int) -> None:
        group = W.open_group("127.0.0.1", port, rank, world, device="cpu", timeout_s=60)
        checksum = W.Checksum()
        if rank == 0:
            buffers = (W.pack(b, w, "cpu") for b in plan.buckets)
            results[rank] = (W.send(group, buffers, checksum), checksum.hexdigest())
        else:
            received = {n: t.clone() for n, t in W.receive(group, plan, "cpu", checksum)}
            results[rank] = (received, checksum.hexdigest())

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    sent, digest = results[0]
    assert sent == plan.num_bytes
    for rank in (1, 2):
        received, got = results[rank]
        assert got == digest
        assert all(torch.equal(received[n], w[n]) for n in w)


def test_checksums_tell_one_flipped_bit_apart():
    a, b = torch.zeros(8), torch.zeros(8)
    b.view(torch.int32)[3] ^= 1  # the smallest denormal: equal to 0 in any tolerance check
    ca, cb = W.Checksum(), W.Checksum()
    ca.update(a)
    cb.update(b)
    assert torch.allclose(a, b) and ca.hexdigest() != cb.hexdigest()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_host_arrays_carry_every_dtype_bit_for_bit_without_a_copy(dtype):
    weights = {"a": torch.randn(3, 4).to(dtype), "b": torch.randn(5).to(dtype)}
    arrays = W.to_host_arrays(weights)
    assert all(isinstance(a, np.ndarray) for _, _, a in arrays)
    raw = weights["a"] if dtype == torch.float32 else weights["a"].view(torch.int16)
    assert np.shares_memory(arrays[0][2], raw.numpy())  # Ray's put is the one copy
    back = dict(W.from_host_arrays(arrays))
    for name, t in weights.items():
        assert back[name].dtype == dtype and torch.equal(back[name], t)
