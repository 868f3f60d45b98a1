"""Splitting a batch across micro-batches or data-parallel ranks leaves loss and gradient unchanged.

With the full batch's counts passed to every part (``global_counts``), the parts' losses add up
to the full-batch loss, so gradient accumulation reproduces the full-batch gradient. A rank
whose gradient is averaged with the others (DDP / DeepSpeed) scales its loss by the world size.
"""

import pytest
import torch

from learner import algorithms as A

pytestmark = pytest.mark.unit  # pure code in this process

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]


def make_batch(seed=0, B=8, T=10):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g)  # includes empty (aborted) rows
    lengths[0] = T
    mask = torch.arange(T) < lengths[:, None]
    r = lambda: torch.randn(B, T, generator=g, dtype=torch.float64)  # noqa: E731
    return {
        "logits_param": r() * 0.1,  # stands in for model output; we differentiate w.r.t. it
        "old_logprobs": r() * 0.1 - 1.0,
        "ref_logprobs": r() * 0.1 - 1.0,
        "advantages": r(),
        "old_values": r(),
        "returns": r(),
        "mask": mask,
    }


def losses(batch, rows, param, mode, counts):
    """Sum of policy, value and KL losses on ``rows`` of the batch, as one micro-batch."""
    nt, ns = counts
    logp = param[rows] - 1.0
    mask = batch["mask"][rows]
    pl, _ = A.policy_loss(
        logp,
        batch["old_logprobs"][rows],
        batch["advantages"][rows],
        mask,
        clip_low=0.2,
        clip_high=0.28,
        dual_clip=3.0,
        agg=mode,
        num_tokens=nt,
        num_seqs=ns,
    )
    vl, _ = A.value_loss(
        param[rows] * 3,
        batch["old_values"][rows],
        batch["returns"][rows],
        mask,
        clip=0.2,
        agg=mode,
        num_tokens=nt,
        num_seqs=ns,
    )
    kl, _ = A.kl_loss(logp, batch["ref_logprobs"][rows], mask, agg=mode, num_tokens=nt, num_seqs=ns)
    return pl + 0.5 * vl + 0.1 * kl


def full(batch, mode):
    param = batch["logits_param"].clone().requires_grad_()
    loss = losses(batch, slice(None), param, mode, (None, None))
    loss.backward()
    return loss.detach(), param.grad


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("split", [[3, 5], [1, 2, 2, 3], [8]])
def test_micro_batches_sum_to_the_full_batch(mode, split):
    batch = make_batch()
    want_loss, want_grad = full(batch, mode)
    counts = A.global_counts(batch["mask"])
    param = batch["logits_param"].clone().requires_grad_()
    total, start = 0.0, 0
    for size in split:
        loss = losses(batch, slice(start, start + size), param, mode, counts)
        loss.backward()  # gradients accumulate across micro-batches
        total += loss.detach()
        start += size
    torch.testing.assert_close(total, want_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(param.grad, want_grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_two_ranks_with_averaged_gradients_match_the_full_batch(mode):
    batch = make_batch(seed=3)
    want_loss, want_grad = full(batch, mode)
    ranks = [torch.arange(0, 8, 2), torch.arange(1, 8, 2)]  # interleaved, as a sampler would
    # all-reduce of the per-rank counts
    per_rank = [A.global_counts(batch["mask"][r]) for r in ranks]
    counts = (sum(c[0] for c in per_rank), sum(c[1] for c in per_rank))
    world = len(ranks)
    grads, total = [], 0.0
    for rows in ranks:
        param = batch["logits_param"].clone().requires_grad_()
        for micro in rows.split(2):  # and micro-batches within each rank
            loss = losses(batch, micro, param, mode, counts) * world
            loss.backward()
            total += loss.detach() / world
        grads.append(param.grad)
    averaged = torch.stack(grads).mean(0)  # what DDP / DeepSpeed all-reduce does
    torch.testing.assert_close(total, want_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(averaged, want_grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_local_denominators_would_break_invariance(mode):
    """The same split with each micro-batch normalising by its own counts gives another loss:
    the invariance above comes from the global counts, not from luck in the data."""
    batch = make_batch()
    want_loss, _ = full(batch, mode)
    param = batch["logits_param"].clone()
    parts = [slice(0, 2), slice(2, 8)]  # 17 vs 18 tokens, 2 vs 5 non-empty rows
    naive = sum(losses(batch, p, param, mode, (None, None)) for p in parts) / len(parts)
    assert abs((naive - want_loss).item()) > 1e-4
