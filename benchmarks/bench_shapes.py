"""The synchronous GRPO step at benchmark shapes, on Ray against plain pieces in one process.

    .venv/bin/python benchmarks/bench_shapes.py [--workloads W1,W2] [--repeats 5] [--warmup 1]
        [--response-tokens R] [--tiny] [key=value ...]

The workloads (DESIGN.md, "Performance bar"; fp32): a 6M-parameter Qwen2 built locally (hidden
256, intermediate 1024, 4 layers, 4 heads, 2 KV heads, vocabulary 4096, untied embeddings),
16 prompts x 4 samples, prompts of exactly 9 tokens (``a+b+c=`` with two-digit operands; the
demo tokenizer spells digits one token each), responses of exactly 32 (W1) or 256 (W2) tokens
(``generator.ignore_eos=true``), one mini-batch, one epoch, lr 1e-5, KL to the reference as a
loss term (k3, coefficient 0.04), the whole batch one micro-batch. Per workload, in this one
process and interleaved (repeat r: one Raylign iteration, then one plain step), after
``--warmup`` untimed rounds of both:

1. **Raylign** on an embedded local Ray (``prepare``, ``init_ray``, ``start_actors``,
   ``start_loop``, then ``Loop.iteration()``): its ``timing/<stage>`` metrics.
2. **Plain pieces** in this process, none of Raylign's classes: ``vllm.LLM.generate``
   (``SamplingParams(n, temperature=1, max_tokens=R, ignore_eos=True, logprobs=0)``, no
   per-prompt seeds; the engine built with the kwargs Raylign's engine uses on CPU: in-process
   engine core, ``uni`` executor, eager, explicit KV cache); reward: decode and check the
   integer answer in a Python loop; reference: a transformers forward under
   ``inference_mode`` over the padded batch (``logits_to_keep``: response positions only),
   log_softmax and gather; train: a second transformers model, the GRPO loss (group-normalised
   advantages, clipped ratio against itself detached, token mean, plus 0.04 x k3 KL), backward,
   ``clip_grad_norm_(1.0)``, ``torch.optim.AdamW`` step; sync: its ``state_dict()`` into the
   engine through ``collective_rpc`` -> the worker's ``reload_weights``, then
   ``reset_prefix_cache``. The plain step is the sum of the five.

Then each Ray actor's peak resident memory (VmHWM of its process; the rule scorer's child
processes beside it) and the driver's (its VmHWM over the workload, reset at the start; and
``getrusage`` over the process's life). Each workload starts and stops its own Ray.

Prints per workload the stage table (Raylign median, plain median, ratio), the step row, the
targets (step <= 1.05x the plain sum, train <= 1.10x, reference <= 1.05x, sync <= 1.5x) met or
missed, the memory table; then one JSON line ``{"bench": "shapes", ...}`` with all of it,
including the measured prompt and response lengths of both sides. A line per repeat goes to
stderr. ``--tiny`` is a smoke run (the default tiny model, 2 prompts x 2 samples, 8 tokens,
2 repeats): it checks the benchmark works, its times mean nothing. ``key=value`` overrides go to
the Raylign side's config (the demo preset plus the overrides above).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestration.tiny_model import TinyModelSpec  # noqa: E402  (a dataclass; imports nothing)

STAGES = ("generate", "reward", "reference", "learner_forward", "advantages", "train", "sync")
PLAIN_STAGES = ("generate", "reward", "reference", "train", "sync")
TARGETS = {"step": 1.05, "train": 1.10, "reference": 1.05, "sync": 1.5}  # Raylign / plain at most
PROMPT_TOKENS = 9
KL_COEF, LR, CLIP = 0.04, 1e-5, 0.2
INTEGER = re.compile(r"[+-]?\d+")


@dataclass(frozen=True)
class Workload:
    name: str
    response_tokens: int
    model: TinyModelSpec
    prompts: int = 16
    samples: int = 4
    repeats: int = 5
    warmup: int = 1

    @property
    def rows(self) -> int:
        return self.prompts * self.samples

    @property
    def max_model_len(self) -> int:
        return PROMPT_TOKENS + self.response_tokens + 55  # room to spare, as a user would set it

    @property
    def kv_cache_mib(self) -> int:
        """Twice the KV cache the whole batch fills (fp32), plus 32 MiB, at least 64 MiB."""
        m = self.model
        per_token = m.num_layers * 2 * (m.num_kv_heads or m.num_heads) * m.hidden_size * 4
        per_token //= m.num_heads  # (layers x K and V x KV heads x head size) floats
        return max(64, 2 * self.rows * self.max_model_len * per_token // 2**20 + 32)

    @property
    def micro_batch_tokens(self) -> int:
        return self.rows * self.max_model_len  # the whole batch in one micro-batch


BENCH_MODEL = TinyModelSpec(  # 6.0M parameters, 2.1M of them the two embeddings
    hidden_size=256,
    intermediate_size=1024,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    vocab_size=4096,
    tie_embeddings=False,
    max_positions=4096,
)
WORKLOADS = {"W1": Workload("W1", 32, BENCH_MODEL), "W2": Workload("W2", 256, BENCH_MODEL)}
TINY = Workload("tiny", 8, TinyModelSpec(), prompts=2, samples=2, repeats=2)


# ---------------------------------------------------------------------- inputs


def build_inputs(root: Path, w: Workload) -> tuple[str, str]:
    """The model (built locally) and a JSON-lines file of prompts that are exactly
    ``PROMPT_TOKENS`` tokens long under its tokenizer; returns both paths."""
    from transformers import AutoTokenizer

    from orchestration.data import addition_corpus
    from orchestration.tiny_model import build_tiny_model

    spec = replace(w.model, max_positions=max(w.model.max_positions, w.max_model_len))
    model = build_tiny_model(str(root / f"model-{w.name}"), addition_corpus(9), spec)
    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = []
    for i in range(4000):  # a fixed pseudo-random walk over a+b+c with two-digit operands
        a, b, c = 10 + (i * 37) % 90, 10 + (i * 53 + 11) % 90, 10 + (i * 71 + 29) % 90
        prompt = f"{a}+{b}+{c}="
        if len(tokenizer(prompt)["input_ids"]) == PROMPT_TOKENS:
            rows.append({"prompt": prompt, "label": str(a + b + c)})
        if len(rows) == 256:
            break
    path = root / f"prompts-{w.name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, str(path)


def raylign_overrides(w: Workload, model: str, prompts: str, root: Path) -> list[str]:
    return [
        f"model.path={model}",
        f"data.source={prompts}",
        f"data.max_prompt_tokens={PROMPT_TOKENS + 7}",
        f"data.prompts_per_iteration={w.prompts}",
        f"generator.samples_per_prompt={w.samples}",
        f"generator.max_new_tokens={w.response_tokens}",
        "generator.ignore_eos=true",
        f"generator.max_model_len={w.max_model_len}",
        f"generator.kv_cache_mib={w.kv_cache_mib}",
        "reward.no_eos_penalty=null",  # every response runs to the limit: keep the rule's score
        f"algorithm.kl_coef={KL_COEF}",
        f"learner.lr={LR}",
        "learner.num_mini_batches=1",
        "learner.ppo_epochs=1",
        f"learner.micro_batch_tokens={w.micro_batch_tokens}",
        f"logging.root={root / 'runs'}",
        f"logging.name={w.name}",
        "logging.progress_bar=false",
    ]


# ---------------------------------------------------------------------- memory


def status_kib(pid: int | str, key: str = "VmHWM") -> int:
    """``key`` of ``/proc/<pid>/status`` in KiB (0 when the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (found through each process's parent in /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, parent in parents.items() if parent in frontier]
        found += kids
        frontier = kids
    return found


def actor_memory(actors) -> dict[str, dict[str, float]]:
    """Peak resident MiB of each Ray actor's process (Ray is local: /proc is theirs too)."""
    import ray

    roles = {f"generator-{i}": a for i, a in enumerate(actors.generators)}
    roles |= {f"scorer-{i}": a for i, a in enumerate(actors.scorers)}
    roles["reference"] = actors.reference
    roles |= {f"learner-{i}": a for i, a in enumerate(actors.learners)}
    pids = ray.get(
        [a.__ray_call__.remote(lambda self: os.getpid()) for a in roles.values()], timeout=60
    )
    out = {}
    for role, pid in zip(roles, pids, strict=True):
        kids = descendants(pid)
        out[role] = {
            "pid": pid,
            "peak_mib": status_kib(pid) / 1024,
            "children_peak_mib": sum(status_kib(k) for k in kids) / 1024,
        }
    return out


def reset_driver_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux ``clear_refs`` 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------- Raylign on Ray


class RaySide:
    """The run's actors on an embedded local Ray and its loop, one iteration per call."""

    def __init__(self, cfg, source: str):
        from orchestration.loop import start_loop
        from orchestration.placement import start_actors
        from orchestration.prepare import prepare
        from orchestration.sampler import PromptSampler
        from orchestration.train import init_ray

        prep = prepare(cfg, source)
        init_ray(cfg, prep.run_dir)
        self.actors = start_actors(cfg, prep.model_path, prep.pad_token_id, prep.reward_model_paths)
        self.loop = start_loop(cfg, self.actors, PromptSampler(prep.prompts, cfg.data.seed), prep)

    def step(self) -> tuple[dict[str, float], dict]:
        import pyarrow.compute as pc

        metrics = self.loop.iteration()
        times = {s: float(metrics.get(f"timing/{s}", 0.0)) for s in (*STAGES, "iteration")}
        batch = self.loop.last_batch
        shape = {
            "rows": batch.num_rows,
            "prompt": pc.list_value_length(batch["prompt_token_ids"]).to_pylist(),
            "response": pc.list_value_length(batch["response_token_ids"]).to_pylist(),
            "mismatch": metrics.get("rollout/logprob_mismatch"),
        }
        return times, shape

    def close(self) -> None:
        import ray

        self.loop.stages.pool.settle(raise_errors=False)  # a weight update under way ends first
        ray.shutdown()


# ---------------------------------------------------------------------- plain pieces


def _reload_weights(worker, weights: dict) -> None:
    """Runs on the vLLM worker (``collective_rpc``): vLLM's own in-place reload."""
    worker.reload_weights(weights_iterator=iter(weights.items()))


def exact_integer(response: str, label: str) -> float:
    answer = response.strip()
    if not INTEGER.fullmatch(answer):
        return 0.0
    return 1.0 if int(answer) == int(label) else 0.1


class Plain:
    """The same work with the field's plain tools, in this process."""

    def __init__(self, model: str, prompts: str, w: Workload, threads: int):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from vllm import LLM, SamplingParams

        torch.set_num_threads(threads)
        self.w = w
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        rows = [json.loads(line) for line in Path(prompts).read_text().splitlines()]
        self.prompts = [(self.tokenizer(r["prompt"])["input_ids"], r["label"]) for r in rows]
        self.next = 0
        self.pad = self.tokenizer.pad_token_id
        self.llm = LLM(
            model=model,
            dtype="float32",
            seed=0,
            max_model_len=w.max_model_len,
            enforce_eager=True,
            load_format="safetensors",
            logprobs_mode="processed_logprobs",
            distributed_executor_backend="uni",
            kv_cache_memory_bytes=w.kv_cache_mib << 20,
        )
        self.params = SamplingParams(
            n=w.samples, temperature=1.0, max_tokens=w.response_tokens, ignore_eos=True, logprobs=0
        )

        def load():
            m = AutoModelForCausalLM.from_pretrained(
                model, dtype=torch.float32, attn_implementation="sdpa"
            )
            return m.eval()

        self.reference = load().requires_grad_(False)
        self.policy = load()
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=LR, weight_decay=0.0)

    def batch(self):
        """The next ``w.prompts`` prompts of the file (cycling)."""
        out = []
        for _ in range(self.w.prompts):
            out.append(self.prompts[self.next % len(self.prompts)])
            self.next += 1
        return out

    def step(self) -> tuple[dict[str, float], dict]:
        import torch

        times = {}
        prompts = self.batch()
        start = time.perf_counter()
        outputs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids, _ in prompts], self.params, use_tqdm=False
        )
        samples = []  # (prompt ids, label, response ids, rollout logprobs), prompt-major
        for (ids, label), request in zip(prompts, outputs, strict=True):
            for out in request.outputs:
                tokens = list(out.token_ids)
                lps = [step[t].logprob for step, t in zip(out.logprobs, tokens, strict=True)]
                samples.append((ids, label, tokens, lps))
        times["generate"] = time.perf_counter() - start

        start = time.perf_counter()
        texts = self.tokenizer.batch_decode([s[2] for s in samples], skip_special_tokens=True)
        scores = [exact_integer(t, s[1]) for t, s in zip(texts, samples, strict=True)]
        times["reward"] = time.perf_counter() - start

        start = time.perf_counter()
        batch = self.pad_batch(samples)
        with torch.inference_mode():
            ref_logprobs = self.logprobs(self.reference, batch)
        times["reference"] = time.perf_counter() - start

        start = time.perf_counter()
        mismatch = self.train(batch, scores, ref_logprobs)
        times["train"] = time.perf_counter() - start

        start = time.perf_counter()
        self.llm.collective_rpc(_reload_weights, args=(self.policy.state_dict(),))
        self.llm.reset_prefix_cache()
        times["sync"] = time.perf_counter() - start
        shape = {
            "rows": len(samples),
            "prompt": [len(s[0]) for s in samples],
            "response": [len(s[2]) for s in samples],
            "mismatch": mismatch,
        }
        return times, shape

    def pad_batch(self, samples) -> dict:
        """Left-padded prompts, right-padded responses: ``input_ids``, ``attention_mask``,
        ``position_ids`` (B, P + R), ``response_ids``, ``response_mask``, ``rollout_logprobs``
        (B, R)."""
        import torch

        b = len(samples)
        p, r = max(len(s[0]) for s in samples), max(len(s[2]) for s in samples)
        input_ids = torch.full((b, p + r), self.pad, dtype=torch.long)
        attention = torch.zeros((b, p + r), dtype=torch.long)
        rollout = torch.zeros((b, r))
        for i, (prompt, _, response, lps) in enumerate(samples):
            input_ids[i, p - len(prompt) : p] = torch.tensor(prompt)
            input_ids[i, p : p + len(response)] = torch.tensor(response)
            attention[i, p - len(prompt) : p + len(response)] = 1
            rollout[i, : len(lps)] = torch.tensor(lps)
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "position_ids": (attention.cumsum(-1) - 1).clamp(min=0),
            "response_ids": input_ids[:, p:],
            "response_mask": attention[:, p:].float(),
            "rollout_logprobs": rollout,
        }

    @staticmethod
    def logprobs(model, batch: dict):
        """(B, R) log-probabilities of the response tokens (temperature 1)."""
        import torch

        r = batch["response_ids"].shape[1]
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            use_cache=False,
            logits_to_keep=r + 1,  # positions P-1 .. P+R-1; the last predicts nothing
        ).logits[:, :r]  # (B, R, V)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        return logprobs.gather(-1, batch["response_ids"].unsqueeze(-1)).squeeze(-1)

    def train(self, batch: dict, scores: list[float], ref_logprobs) -> float:
        """One GRPO step; returns the mean |rollout - policy| log-probability gap (the plain
        sync's check: vLLM sampled with the weights the policy has)."""
        import torch

        mask = batch["response_mask"]
        s = torch.tensor(scores).view(-1, self.w.samples)  # (prompts, samples)
        advantages = ((s - s.mean(1, keepdim=True)) / (s.std(1, keepdim=True) + 1e-6)).view(-1, 1)
        logprobs = self.logprobs(self.policy, batch)  # (B, R)
        ratio = torch.exp(logprobs - logprobs.detach())
        pg = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - CLIP, 1 + CLIP))
        log_r = ref_logprobs - logprobs
        kl = torch.exp(log_r) - log_r - 1  # k3
        loss = ((pg + KL_COEF * kl) * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        gap = (batch["rollout_logprobs"] - logprobs.detach()).abs() * mask
        return float(gap.sum() / mask.sum())

    def close(self) -> None:
        from vllm.distributed.parallel_state import (
            destroy_distributed_environment,
            destroy_model_parallel,
        )

        del self.llm
        gc.collect()
        destroy_model_parallel()
        destroy_distributed_environment()


# ---------------------------------------------------------------------- one workload


def run_workload(w: Workload, root: Path, overrides: list[str]) -> dict:
    from orchestration.config import load_config

    model, prompts = build_inputs(root, w)
    cfg = load_config("demo", [*raylign_overrides(w, model, prompts, root), *overrides])
    reset = reset_driver_peak()
    ray_side = RaySide(cfg, f"shapes-{w.name}")
    driver_ray_kib = status_kib("self")
    try:
        plain = Plain(model, prompts, w, cfg.cluster.torch_threads)
        ray_t, plain_t, ray_shape, plain_shape = [], [], [], []
        for r in range(w.warmup + w.repeats):
            rt, rs = ray_side.step()
            pt, ps = plain.step()
            pt["sum"] = sum(pt[s] for s in PLAIN_STAGES)
            timed = r >= w.warmup
            if timed:
                ray_t.append(rt)
                plain_t.append(pt)
            ray_shape.append(rs)
            plain_shape.append(ps)
            what = f"repeat {r - w.warmup + 1}/{w.repeats}" if timed else f"warm-up {r + 1}"
            print(
                f"{w.name} {what}: Raylign {rt['iteration']:.3f} s, plain {pt['sum']:.3f} s "
                f"(generate {rt['generate']:.3f}/{pt['generate']:.3f}, "
                f"train {rt['train']:.3f}/{pt['train']:.3f})",
                file=sys.stderr,
                flush=True,
            )
        memory = actor_memory(ray_side.actors)
        plain.close()
    finally:
        ray_side.close()
    memory["driver"] = {
        "pid": os.getpid(),
        "peak_mib": status_kib("self") / 1024,
        "peak_before_plain_mib": driver_ray_kib / 1024,
        "peak_reset": reset,
        "maxrss_lifetime_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    return summarize(w, cfg, ray_t, plain_t, ray_shape, plain_shape, memory)


def _lengths(shapes: list[dict], key: str) -> dict[str, int]:
    values = [n for s in shapes for n in s[key]]
    return {"min": min(values), "max": max(values)}


def summarize(w, cfg, ray_t, plain_t, ray_shape, plain_shape, memory) -> dict:
    ray_m = {k: statistics.median(t[k] for t in ray_t) for k in (*STAGES, "iteration")}
    plain_m = {k: statistics.median(t[k] for t in plain_t) for k in (*PLAIN_STAGES, "sum")}
    pairs = {"step": (ray_m["iteration"], plain_m["sum"])}
    pairs |= {s: (ray_m[s], plain_m[s]) for s in ("train", "reference", "sync")}
    targets = {
        k: {"ratio": a / b, "bound": TARGETS[k], "met": a <= TARGETS[k] * b}
        for k, (a, b) in pairs.items()
    }
    mismatches = [s["mismatch"] for s in ray_shape if s["mismatch"] is not None]
    shapes = {"raylign": ray_shape, "plain": plain_shape}
    return {
        "workload": asdict(w),
        "raylign_config": {
            "micro_batch_tokens": cfg.learner.micro_batch_tokens,
            "kv_cache_mib": cfg.generator.kv_cache_mib,
            "max_model_len": cfg.generator.max_model_len,
            "torch_threads": cfg.cluster.torch_threads,
            "weight_sync": cfg.weight_sync.method,
        },
        "raylign_s": ray_m,
        "plain_s": plain_m,
        "raylign_repeats_s": ray_t,
        "plain_repeats_s": plain_t,
        "targets": targets,
        "rows": {"raylign": ray_shape[-1]["rows"], "plain": plain_shape[-1]["rows"]},
        "prompt_tokens": {k: _lengths(v, "prompt") for k, v in shapes.items()},
        "response_tokens": {k: _lengths(v, "response") for k, v in shapes.items()},
        "logprob_mismatch_max": {  # vLLM's log-probabilities against the learner's / policy's
            "raylign": max(mismatches) if mismatches else None,
            "plain": max(s["mismatch"] for s in plain_shape),
        },
        "memory_mib": memory,
    }


# ---------------------------------------------------------------------- output


def print_tables(record: dict) -> None:
    w, ray_m, plain_m = record["workload"], record["raylign_s"], record["plain_s"]
    print(
        f"\n{w['name']}: {w['prompts']} prompts x {w['samples']} samples, "
        f"{record['prompt_tokens']['plain']['max']}-token prompts, "
        f"{w['response_tokens']}-token responses; medians of {w['repeats']} repeats"
    )
    print(f"{'stage':<18}{'Raylign (s)':>13}{'plain (s)':>13}{'ratio':>8}")
    for stage in STAGES:
        a, b = ray_m[stage], plain_m.get(stage)
        cells = (f"{b:.4f}", f"{a / b:.2f}" if b else "-") if b is not None else ("-", "-")
        print(f"{stage:<18}{a:>13.4f}{cells[0]:>13}{cells[1]:>8}")
    step, total = ray_m["iteration"], plain_m["sum"]
    print(f"{'step':<18}{step:>13.4f}{total:>13.4f}{step / total:>8.2f}")
    for name, t in record["targets"].items():
        verdict = "met" if t["met"] else "missed"
        print(f"target {name:<10} <= {t['bound']:.2f}x plain: {t['ratio']:.2f}x  {verdict}")
    print(f"{'process':<14}{'pid':>8}{'peak MiB':>10}{'children MiB':>14}")
    for role, m in record["memory_mib"].items():
        kids = f"{m['children_peak_mib']:.0f}" if "children_peak_mib" in m else "-"
        print(f"{role:<14}{m['pid']:>8}{m['peak_mib']:>10.0f}{kids:>14}")
    d = record["memory_mib"]["driver"]
    print(
        f"  (driver: {d['peak_before_plain_mib']:.0f} MiB after Raylign's start, before the plain "
        f"pieces; getrusage over the process's life {d['maxrss_lifetime_mib']:.0f} MiB)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="W1,W2", help="comma-separated: W1, W2")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 1)")
    parser.add_argument("--response-tokens", type=int, default=None, help="override R")
    parser.add_argument("--tiny", action="store_true", help="a smoke run; times mean nothing")
    parser.add_argument("overrides", nargs="*", help="key=value for the Raylign side")
    args = parser.parse_args()

    # Before vllm is imported: the engine core in this process, as Raylign's generators run it.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    workloads = [TINY] if args.tiny else [WORKLOADS[n.strip()] for n in args.workloads.split(",")]
    root = Path(tempfile.mkdtemp(prefix="raylign-shapes-"))
    records = {}
    for w in workloads:
        w = replace(
            w,
            repeats=w.repeats if args.repeats is None else args.repeats,
            warmup=w.warmup if args.warmup is None else args.warmup,
            response_tokens=args.response_tokens or w.response_tokens,
        )
        records[w.name] = run_workload(w, root, args.overrides)
        print_tables(records[w.name])
    shutil.rmtree(root, ignore_errors=True)  # the models, prompts and the runs' logs
    record = {"bench": "shapes", "tiny": args.tiny, "cpus": os.cpu_count()}
    print(json.dumps(record | {"overrides": args.overrides, "workloads": records}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
