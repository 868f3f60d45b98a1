"""Pieces the end-to-end tests share: running the entry point and reading what it left, the
demo's learning thresholds and a healthy run's invariants, comparing two runs' iterations,
the nodes of a simulated cluster, and greedy tokens from a fresh vLLM engine in a process of its
own (as a user loading an exported policy would).

Thresholds for the demo task (exact_integer with the EOS trick, operands 0..4): a random policy
scores about 0.05 (it rarely stops with an integer); stopping with a random integer of 0..8 is
worth 0.1 + 0.9/9 = 0.2; so a mean reward of 0.6 means most prompts are answered right
((0.6 - 0.1) / 0.9 = 56% exact answers), which format alone cannot reach. Measured with seeds 0,
1, 2 (200 iterations): GRPO ended at 0.948, 0.756, 0.993 and PPO at 0.904, 0.958, 0.926, each
from a first-5 mean under 0.1.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO, history

THRESHOLD = 0.6  # mean reward of the last 5 iterations
MARGIN = 0.4  # over the mean of the first 5

# Iteration-for-iteration comparison of two runs (resume): equal, and equal within float noise.
SAME = ["rollout/weight_version", "data/epoch", "reward/score_mean", "rollout/samples"]
CLOSE = ["actor/pg_loss", "actor/kl_ref", "actor/entropy", "actor/grad_norm", "actor/clipfrac"]


def train_command(args: list[str]) -> list[str]:
    """``python -m orchestration.train *args`` as the tests run it (no progress bar)."""
    return [sys.executable, "-m", "orchestration.train", *args, "logging.progress_bar=false"]


def train(args: list[str], env: dict[str, str], timeout: float = 600):
    """``python -m orchestration.train`` in a process of its own, as a user runs it."""
    return subprocess.run(
        train_command(args),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train_together(
    runs: list[list[str]], env: dict[str, str], timeout: float = 600
) -> list[subprocess.CompletedProcess]:
    """:func:`train` for each of ``runs``, side by side: two short runs on two cores take about
    70% of the time one after the other does (their start-ups wait on each other's less than on
    themselves: 41 s against 56 s for two 3-iteration demo runs here)."""
    import tempfile

    with tempfile.TemporaryDirectory() as logs:
        started = []
        for k, args in enumerate(runs):
            command = train_command(args)
            out, err = Path(logs, f"{k}.out"), Path(logs, f"{k}.err")
            with out.open("w") as o, err.open("w") as e:  # files: a long run fills a pipe
                proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=o, stderr=e)
            started.append((command, proc, out, err))
        done = []
        for command, proc, out, err in started:
            code = proc.wait(timeout=timeout)
            done.append(
                subprocess.CompletedProcess(command, code, out.read_text(), err.read_text())
            )
        return done


def finished(out: subprocess.CompletedProcess, root: Path) -> tuple[dict, list[dict]]:
    """The summary and history of the one run under ``root``, which must have succeeded."""
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    (run_dir,) = [p for p in root.iterdir() if p.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (run_dir / "policy" / "model.safetensors").is_file()
    return summary, history(run_dir)


def check_run_health(history: list[dict]) -> None:
    # The generators served the version the learner produced on every iteration...
    assert [h["rollout/weight_version"] for h in history] == list(range(len(history)))
    # ... so vLLM's log-probabilities and the learner's agree (fp32).
    assert max(h["rollout/logprob_mismatch"] for h in history) < 1e-3
    for stage in ("generate", "reward", "reference", "learner_forward", "train", "sync"):
        assert all(h[f"timing/{stage}"] > 0 for h in history)
    assert all(h["sync/bytes"] > 0 and h["sync/seconds"] > 0 for h in history)


def assert_learned(summary: dict, history: list[dict], present: str, absent: str) -> None:
    """The demo's learning thresholds, a healthy run, and the algorithm's own metrics."""
    assert summary["reward_first"] < 0.2
    assert summary["reward_last"] >= THRESHOLD, summary["reward_curve"]
    assert summary["reward_last"] - summary["reward_first"] >= MARGIN
    assert summary["wall_time_s"] < 600
    check_run_health(history)
    assert present in history[-1] and absent not in history[-1]


def by_iteration(run_dir: Path) -> dict[int, dict]:
    return {r["iteration"]: r for r in history(run_dir)}


def assert_same_iteration(a: Path, b: Path, k: int) -> None:
    """Iteration ``k`` of runs ``a`` and ``b``: the same metrics, prompts, seeds, tokens and
    scores; log-probabilities, advantages and losses within 1e-5 (relative)."""
    import pyarrow.parquet as pq

    ha, hb = by_iteration(a)[k], by_iteration(b)[k]
    for key in SAME:
        assert ha[key] == hb[key], (k, key)
    for key in CLOSE:
        assert hb[key] == pytest.approx(ha[key], rel=1e-5, abs=1e-8), (k, key)
    ra = pq.read_table(a / "rollouts" / f"iter_{k:06d}.parquet").to_pydict()
    rb = pq.read_table(b / "rollouts" / f"iter_{k:06d}.parquet").to_pydict()
    for column in ("prompt_id", "dataset_row", "sample_seed", "response_token_ids", "score"):
        assert ra[column] == rb[column], (k, column)
    for column in ("rollout_logprobs", "old_logprobs", "advantages"):
        x = np.concatenate([np.asarray(v, np.float64) for v in ra[column]])
        y = np.concatenate([np.asarray(v, np.float64) for v in rb[column]])
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-7, err_msg=f"{k} {column}")


def assert_same_before_the_update(a: Path, b: Path, k: int) -> None:
    """Iteration ``k``'s batch in two runs: the same prompts and seeds, and each row's tokens
    of its first weight version the same as far as both runs have them."""
    import pyarrow.parquet as pq

    ra = pq.read_table(a / "rollouts" / f"iter_{k:06d}.parquet").to_pylist()
    rb = pq.read_table(b / "rollouts" / f"iter_{k:06d}.parquet").to_pylist()
    assert [(r["prompt_id"], r["sample_seed"]) for r in ra] == [
        (r["prompt_id"], r["sample_seed"]) for r in rb
    ]

    def first_version_tokens(row: dict) -> list[int]:
        pairs = zip(row["response_token_ids"], row["token_versions"], strict=True)
        return [t for t, v in pairs if v == row["weight_version"]]

    for x, y in zip(ra, rb, strict=True):
        first, second = first_version_tokens(x), first_version_tokens(y)
        n = min(len(first), len(second))
        assert first[:n] == second[:n]


def node_of(actor) -> str:
    """The id of the node an actor runs on."""
    import ray

    return ray.get(
        actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()),
        timeout=60,
    )


def nodes_with(resource: str) -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and resource in n["Resources"]}


_GREEDY_IN_VLLM = """
import json, sys
from actors.vllm_engine import EngineSpec, Sampling, VLLMEngine
path, prompts = sys.argv[1], json.loads(sys.argv[2])
new, length = int(sys.argv[3]), int(sys.argv[4])
engine = VLLMEngine(EngineSpec(model_path=path, max_model_len=length, kv_cache_bytes=64 << 20))
out = engine.generate(prompts, list(range(len(prompts))), Sampling(temperature=0.0,
                      max_new_tokens=new))
print("TOKENS " + json.dumps([s.response_token_ids for s in out]))
if len(sys.argv) > 5:
    beams = engine.beam_search(prompts, list(range(len(prompts))), int(sys.argv[5]), new)
    rows = [(b.prompt_id, b.response_token_ids, b.rollout_logprobs) for b in beams]
    print("BEAMS " + json.dumps(rows))
"""


def greedy_in_fresh_vllm(
    path: str | Path,
    prompts: list[list[int]],
    max_new_tokens: int,
    max_model_len: int,
    beam_width: int = 0,
):
    """Greedy responses of a new vLLM engine loading ``path``, in a process of its own; with
    ``beam_width``, also its beams, ``(greedy, [(prompt index, response, logprobs)])``."""
    args = [str(path), json.dumps(prompts), str(max_new_tokens), str(max_model_len)]
    args += [str(beam_width)] if beam_width else []
    out = subprocess.run(
        [sys.executable, "-c", _GREEDY_IN_VLLM, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    greedy = json.loads(lines["TOKENS"])
    return (greedy, json.loads(lines["BEAMS"])) if beam_width else greedy
