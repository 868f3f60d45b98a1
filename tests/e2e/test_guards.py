"""Runs that go wrong, side by side through the real entry point on the session's shared Ray head:
each gets one clear message, its own exit code and a checkpoint, and the console stays readable.

1. Reward functions that misbehave (a string return, an exception on every sample, a hang):
   every sample is unscorable and counted per function, each function is reported once with
   its first error, and after ``reward.max_unscorable_in_a_row`` iterations the run stops with
   exit code 5 naming them.
2. Generators off the learner's policy: with a mismatch bound no real run meets, every
   iteration warns with the likely causes, and after ``generator.max_mismatch_in_a_row`` the run
   stops with exit code 4.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.e2e.helpers import train_together
from tests.helpers import history, joining

pytestmark = pytest.mark.slow
M = "tests.reward_service.misbehaving:"
SMALL = [
    "--config=demo",
    "iterations=6",
    "data.prompts_per_iteration=4",
    "generator.samples_per_prompt=4",
    "checkpoint.every=0",
]


FUNCTIONS = [M + "high", M + "always_raises", M + "always_hangs"]
RUNS = {
    "unscorable": [
        "reward.functions=[" + ", ".join(f"{{name: '{f}'}}" for f in FUNCTIONS) + "]",
        "reward.no_eos_penalty=null",  # else a response that never stops scores 0, not null
        "reward.function_timeout_s=1",
        "reward.max_unscorable_in_a_row=2",
    ],
    # No real run gets within 1e-12 (fp32 kernels differ by about 1e-7): every iteration is
    # "off-policy", which is what a broken sync looks like to the guard.
    "mismatch": ["generator.max_logprob_mismatch=1e-12", "generator.max_mismatch_in_a_row=2"],
}


@pytest.fixture(scope="module")
def runs(shared_head, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Both runs, side by side on the session's Ray head: name -> (process, run directory)."""
    root = tmp_path_factory.mktemp("guards")
    env = joining(shared_head, root)
    where = {name: [f"logging.root={root / 'runs'}", f"logging.name={name}"] for name in RUNS}
    done = train_together([[*SMALL, *where[name], *args] for name, args in RUNS.items()], env)
    return {name: (out, root / "runs" / name) for name, out in zip(RUNS, done, strict=True)}


def test_misbehaving_reward_functions_are_counted_reported_once_and_stop_the_run(runs):
    out, run_dir = runs["unscorable"]
    console = out.stdout + out.stderr
    assert out.returncode == 5, console[-4000:]
    # The stop names every function with its first error, and says what was kept.
    (error,) = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert error.startswith(
        "error: iteration 1: no sample could be scored, 2 iterations in a row "
        "(reward.max_unscorable_in_a_row=2); the run stopped: it was training on nothing."
    )
    assert (
        f"reward function '{M}high' failed on 32 of 32 samples so far; first error: "
        "returned 'high' (str), not a number" in error
    )
    assert (
        f"'{M}always_raises' failed on 32 of 32 samples so far; first error: ValueError: "
        "no verdict for '"
        in error
        and "(misbehaving.py:" in error
    )
    assert (
        f"'{M}always_hangs' failed on 32 of 32 samples so far; first error: no answer "
        "within reward.function_timeout_s=1" in error
    )
    checkpoint = run_dir / "checkpoints" / "iter_000001"
    assert f"(checkpoint: {checkpoint})" in error and (checkpoint / "COMMITTED").is_file()
    # One message per function per run, no traceback per sample or per iteration.
    for f in FUNCTIONS:
        assert console.count(f"warning: reward function '{f}' failed") == 1, f
    assert "Traceback" not in console
    assert console.count("no sample could be scored (1 of 2 in a row") == 1
    # Every sample of every iteration unscorable and counted per function.
    records = history(run_dir)
    assert [r["reward/unscorable_fraction"] for r in records] == [1.0, 1.0]
    for r in records:
        assert all(r[f"reward/errors/{f}"] == 16 for f in FUNCTIONS)
    # The quiet console: vLLM's per-sync note and start-up advice went to the logs only.
    assert "RotaryEmbedding" not in console and "LD_PRELOAD" not in console
    generator_log = (run_dir / "logs" / "generator-0.log").read_text()
    assert "RotaryEmbedding: Failed to load weights" in generator_log
    assert "LD_PRELOAD" in generator_log


def test_generators_off_the_policy_warn_then_stop_the_run(runs):
    out, run_dir = runs["mismatch"]
    console = out.stdout + out.stderr
    assert out.returncode == 4, console[-4000:]
    (warning,) = [line for line in console.splitlines() if line.startswith("warning: iteration")]
    assert "the generators are off the learner's policy" in warning and "(1 of 2" in warning
    assert "likely causes:" in warning
    (error,) = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert error.startswith("error: iteration 1: the generators are off the learner's policy")
    assert "for 2 iterations in a row (generator.max_mismatch_in_a_row=2)" in error
    assert "resume=auto" in error
    assert (run_dir / "checkpoints" / "iter_000001" / "COMMITTED").is_file()
