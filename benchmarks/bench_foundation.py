"""Time the foundation's hot paths and print a table plus one JSON line.

    .venv/bin/python benchmarks/bench_foundation.py [--rows 1024] [--max-len 512] [--repeats 5]

1. The rollout contract at a realistic batch: ``validate``, ``to_padded`` (tokens plus two
   per-token columns) and ``to_list_column`` back, for ``--rows`` samples with prompts and
   responses of up to ``--max-len`` tokens.
2. Per-token log-probabilities from logits, two ways: gathered logit minus logsumexp against
   ``log_softmax`` followed by ``gather`` (which first materialises a full (B, T, V)
   log-probability tensor); for scoring (no grad) and for training (forward and backward),
   each through ``learner.algorithms.logprobs_from_logits`` where it applies.

Times are the median of ``--repeats`` runs after one warm-up, with torch using the threads it
was given (``--threads``, default 2, the development machine's cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from learner.algorithms import logprobs_from_logits
from rollout import GeneratedSample, build_rollout_table, to_list_column, to_padded, validate


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def make_table(rows: int, max_len: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(rows):
        p = int(rng.integers(1, max_len + 1))
        r = int(rng.integers(1, max_len + 1))
        samples.append(
            GeneratedSample(
                prompt_id=i // 4,
                sample_index=i % 4,
                prompt_token_ids=rng.integers(0, 32_000, p).tolist(),
                response_token_ids=rng.integers(0, 32_000, r).tolist(),
                rollout_logprobs=(-rng.random(r)).tolist(),
                finish_reason="stop",
            )
        )
    return build_rollout_table(samples, weight_version=0)


def bench_contract(rows: int, max_len: int, repeats: int) -> dict[str, float]:
    table = make_table(rows, max_len)
    padded = to_padded(table, pad_token_id=0, per_token_columns=["rollout_logprobs"])
    values = padded.per_token["rollout_logprobs"]
    tokens = int(padded.attention_mask.sum())
    out = {
        "contract/rows": rows,
        "contract/tokens": tokens,
        "contract/validate_s": median_time(lambda: validate(table), repeats),
        "contract/to_padded_s": median_time(
            lambda: to_padded(table, pad_token_id=0, per_token_columns=["rollout_logprobs"]),
            repeats,
        ),
        "contract/to_list_column_s": median_time(
            lambda: to_list_column(values, padded.response_mask), repeats
        ),
    }
    out["contract/to_padded_tokens_per_s"] = tokens / out["contract/to_padded_s"]
    return out


def bench_logprobs(batch: int, seq: int, vocab: int, repeats: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(batch, seq, vocab, generator=g)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)

    def gather_minus_lse():
        logits = base.clone().requires_grad_()
        logprobs_from_logits(logits, ids).sum().backward()

    def log_softmax_then_gather():
        logits = base.clone().requires_grad_()
        torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).sum().backward()

    with torch.no_grad():
        a = logprobs_from_logits(base, ids)
        b = torch.log_softmax(base, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)

    def scoring_gather_minus_lse():
        with torch.no_grad():
            logprobs_from_logits(base, ids)

    def scoring_log_softmax_then_gather():
        with torch.no_grad():
            torch.log_softmax(base, -1).gather(-1, ids.unsqueeze(-1))

    t_lse = median_time(gather_minus_lse, repeats)
    t_lsm = median_time(log_softmax_then_gather, repeats)
    s_lse = median_time(scoring_gather_minus_lse, repeats)
    s_lsm = median_time(scoring_log_softmax_then_gather, repeats)
    return {
        "logprobs/shape": f"{batch}x{seq}x{vocab}",
        "logprobs/max_abs_diff": float((a - b).abs().max()),
        "logprobs/train_gather_minus_logsumexp_s": t_lse,
        "logprobs/train_log_softmax_gather_s": t_lsm,
        "logprobs/score_gather_minus_logsumexp_s": s_lse,
        "logprobs/score_log_softmax_gather_s": s_lsm,
        "logprobs/full_vocab_tensor_mib": batch * seq * vocab * 4 / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1024, help="samples in the rollout table")
    ap.add_argument("--max-len", type=int, default=512, help="longest prompt / response")
    ap.add_argument("--vocab", type=int, default=32_000, help="vocabulary for the logprob bench")
    ap.add_argument("--lp-batch", type=int, default=8, help="rows for the logprob bench")
    ap.add_argument("--lp-seq", type=int, default=256, help="tokens per row for the logprob bench")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    results = {"threads": args.threads}
    results |= bench_contract(args.rows, args.max_len, args.repeats)
    results |= bench_logprobs(args.lp_batch, args.lp_seq, args.vocab, args.repeats)
    width = max(len(k) for k in results)
    for k, v in results.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
