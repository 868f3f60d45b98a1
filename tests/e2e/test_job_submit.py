"""The README's first command (minus the install): a local Ray head with token auth and the
dashboard, the demo submitted with `ray job submit`, the reward printed. The job is the whole demo
(GRPO, 200 iterations), so this is also the test that GRPO learns the built-in task
(``tests/e2e/helpers.py`` holds the thresholds). A pipeline of stages submitted as one job is
``test_pipeline.py``."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.e2e.helpers import assert_learned
from tests.helpers import REPO, VENV, free_port, kill_head

pytestmark = pytest.mark.slow


def test_quickstart_submits_the_demo_as_a_ray_job(private_env):
    env = {k: v for k, v in private_env.items() if k != "RAY_AUTH_TOKEN_PATH"} | {
        "RAYLIGN_SKIP_INSTALL": "1",
        "RAYLIGN_DASHBOARD_PORT": str(free_port()),
        "RAYLIGN_VENV": str(VENV),
    }
    try:
        out = subprocess.run(
            ["scripts/quickstart.sh"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:  # the script's head (`ray stop` would stop every head here): Ray's default port
        kill_head(env["TMPDIR"], 6379)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "succeeded" in out.stdout + out.stderr
    run_dir = Path(re.search(r"run directory:\s+(\S+)", out.stdout).group(1))
    summary = json.loads((run_dir / "summary.json").read_text())
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert summary["iterations"] == 200
    assert_learned(summary, history, "actor/kl_loss", "critic/value_loss")  # GRPO: no critic
    assert f"final reward:   {summary['reward_last']:.3f}" in out.stdout
    assert "dashboard:      http://127.0.0.1:" in out.stdout
    assert "paste what `ray get-auth-token` prints" in out.stdout  # how to get past its login
    # The job's console: one line per iteration and no library chatter, which went to the
    # run's logs (vLLM's per-sync note, its CPU start-up advice).
    console = out.stdout + out.stderr
    assert console.count("iter  199 ") == 1
    for benign in ("RotaryEmbedding", "LD_PRELOAD", "Loading weights", "NUMA binding"):
        assert benign not in console, benign
    assert (
        "RotaryEmbedding: Failed to load weights" in (run_dir / "logs/generator-0.log").read_text()
    )
    assert f"report:         {run_dir}/report.html" in out.stdout
    assert (run_dir / "report.html").stat().st_size > 10_000  # plots inlined
    assert list((run_dir / "tensorboard").iterdir())
    # The job's token file was made for this test's HOME: auth was on.
    assert (Path(env["HOME"]) / ".ray" / "auth_token").is_file()
