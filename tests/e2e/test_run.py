"""End to end on a local Ray: real vLLM (CPU), real DeepSpeed (gloo), the real entry point. The
demo's learning thresholds are explained in ``tests/e2e/helpers.py``.

One full learning proof per method: GRPO is the quick start's job (``test_job_submit.py``), PPO
is ``test_operate.py``'s run, asynchronous GRPO is here, the learned reward model is in
``test_rewards.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.e2e.helpers import (
    MARGIN,
    THRESHOLD,
    assert_same_before_the_update,
    assert_same_iteration,
    finished,
    train,
)
from tests.helpers import REPO
from tests.helpers import history as read_history

pytestmark = pytest.mark.slow


def test_the_demo_learns_with_generation_one_batch_ahead_and_resumes_exactly(head_env, tmp_path):
    """``demo-async``: the demo with ``max_staleness=1`` and partial rollouts (every batch after
    the first started by the weights before the ones it trains, corrected by truncated
    importance weights) passes the demo's thresholds. Resumed from its checkpoint after
    iteration 59, which holds batch 60 (sampled ahead while iteration 59 trained), the run
    trains that very batch (not one sampled again by weights 60): iteration 60 is the
    uninterrupted one exactly. So is iteration 61 unless a weight update reached its batch
    mid-way in either run (``rollout/partial_fraction``; where it lands is timing): then the
    same prompts and seeds, and the same tokens before the update."""
    root = tmp_path / "runs"
    common = ["--config", "demo-async", f"logging.root={root}", "logging.rollouts_every=1"]
    summary, history = finished(
        train([*common, "iterations=120", "checkpoint.every=60"], head_env), root
    )
    assert summary["iterations"] == 120  # (0.82 here at 120, 0.96 at the preset's 200)
    assert summary["reward_first"] < 0.2
    assert summary["reward_last"] >= THRESHOLD, summary["reward_curve"]
    assert summary["reward_last"] - summary["reward_first"] >= MARGIN
    assert [h["rollout/weight_version"] for h in history] == list(range(120))
    assert [h["rollout/staleness_mean"] for h in history] == [0.0] + [1.0] * 119
    assert all(0 < h["off_policy/weight_mean"] <= 2.0 for h in history)
    assert max(h["off_policy/ratio_max"] for h in history[1:]) > 1.0  # the gap was real

    whole = root / "demo-async"
    checkpoint = whole / "checkpoints" / "iter_000059"
    assert (checkpoint / "pending_0.parquet").is_file()
    resumed = [*common, "iterations=62", f"resume={checkpoint}", "logging.name=parts"]
    out = train(resumed, head_env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert "resume: continuing after iteration 59" in out.stdout
    parts = read_history(root / "parts")
    for k in (60, 61):
        got = next(h for h in parts if h["iteration"] == k)
        continued = got["rollout/partial_fraction"] or history[k]["rollout/partial_fraction"]
        if k == 61 and continued:
            assert_same_before_the_update(whole, root / "parts", k)
            continue
        assert_same_iteration(whole, root / "parts", k)
        for key in ("off_policy/weight_mean", "off_policy/ratio_max", "rollout/staleness_mean"):
            assert got[key] == pytest.approx(history[k][key], rel=1e-5), (k, key)


BAD_INPUT = {  # the arguments, and the line that must say what is wrong
    "unknown key": (["learner.lrr=1e-3"], "learner.lrr: unknown key; did you mean 'lr'?"),
    "out of range": (
        ["generator.temperature=-1"],
        "generator.temperature: Input should be greater than 0",
    ),
    "no model": (
        ["model.path=/no/such/model"],
        "model.path: model path '/no/such/model' does not exist",
    ),
    "bad row": (
        ["data.source={rows}", "data.strict=true"],
        "prompts.jsonl, line 2: no 'prompt' (every row needs a prompt, 'messages' or",
    ),
    "pickled weights": (
        ["model.path={pickled}"],
        "the weights are pytorch_model.bin, not safetensors; Raylign loads safetensors only",
    ),
    "small vocab": (
        ["model.path={small_vocab}"],
        "but the model's embedding holds vocab_size=8 (config.json): ids 8 to",
    ),
    "hub unreachable": (  # a hub name on a machine that cannot reach the hub (a closed port)
        ["model.path=someorg/not-here"],
        "model.path 'someorg/not-here' is neither a local directory nor reachable: the "
        "Hugging Face hub (http://127.0.0.1:9) did not answer",
    ),
}


@pytest.fixture(scope="module")
def bad_runs(tiny_model, tmp_path_factory) -> dict[str, tuple]:
    """Every bad-input run started at once (each only checks its input, in a process of its
    own: side by side they take half the time): name -> (process, start time, stdout, stderr
    files)."""
    root = tmp_path_factory.mktemp("bad_input")
    rows = root / "prompts.jsonl"
    rows.write_text('{"prompt": "1+2=", "label": 3}\n{"label": 4}\n')
    pickled, small_vocab = root / "pickled", root / "small_vocab"
    shutil.copytree(tiny_model, pickled)  # the same model, its weights as a pickle
    weights = load_file(pickled / "model.safetensors")
    (pickled / "model.safetensors").unlink()
    torch.save(weights, pickled / "pytorch_model.bin")
    shutil.copytree(tiny_model, small_vocab)  # a config whose embedding is smaller than its
    config = json.loads((small_vocab / "config.json").read_text())  # tokenizer's ids
    (small_vocab / "config.json").write_text(json.dumps(config | {"vocab_size": 8}))
    home, tmp = root / "home", tempfile.mkdtemp(prefix="rl", dir="/tmp")
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "HOME": str(home),
        "TMPDIR": tmp,
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HOME": str(root / "hf"),
    }
    runs = {}
    for name, (args, _) in BAD_INPUT.items():
        args = [a.format(rows=rows, pickled=pickled, small_vocab=small_vocab) for a in args]
        out, err = root / f"{len(runs)}.out", root / f"{len(runs)}.err"
        command = [sys.executable, "-m", "orchestration.train", "--config", "demo"]
        command += [f"logging.root={root}/runs/{len(runs)}", *args, "logging.progress_bar=false"]
        with out.open("w") as o, err.open("w") as e:
            proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=o, stderr=e)
        runs[name] = (proc, time.monotonic(), out, err)
    yield runs
    for proc, *_ in runs.values():
        proc.kill()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_fails_before_any_actor_starts(bad_runs, case):
    proc, start, out, err = bad_runs[case]
    assert proc.wait(timeout=120) == 2
    assert time.monotonic() - start < 60  # seconds, not transformers' retries
    stdout, stderr = out.read_text(), err.read_text()
    assert BAD_INPUT[case][1] in stderr
    assert "Started a local Ray" not in stdout + stderr
    assert "ray:" not in stdout  # init_ray never ran
