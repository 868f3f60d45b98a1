"""The README's first command (minus the install): a local Ray head with token auth and the
dashboard, the demo submitted with `ray job submit`, the reward printed. The job is the whole demo
(GRPO, 200 iterations), so this is also the test that GRPO learns the built-in task
(``test_run.py`` holds the thresholds and the PPO and scale-out runs)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.test_run import assert_learned

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent  # the environment running the tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_quickstart_submits_the_demo_as_a_ray_job(private_env):
    env = {k: v for k, v in private_env.items() if k != "RAY_AUTH_TOKEN_PATH"} | {
        "RAYLIGN_SKIP_INSTALL": "1",
        "RAYLIGN_STOP_RAY": "1",
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
    finally:
        ray = str(VENV / "bin" / "ray")
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "succeeded" in out.stdout + out.stderr
    run_dir = Path(re.search(r"run directory:\s+(\S+)", out.stdout).group(1))
    summary = json.loads((run_dir / "summary.json").read_text())
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert summary["iterations"] == 200
    assert_learned(summary, history, "actor/kl_loss", "critic/value_loss")  # GRPO: no critic
    assert f"final reward:   {summary['reward_last']:.3f}" in out.stdout
    assert "dashboard:      http://127.0.0.1:" in out.stdout
    assert f"report:         {run_dir}/report.html" in out.stdout
    assert (run_dir / "report.html").stat().st_size > 10_000  # plots inlined
    assert list((run_dir / "tensorboard").iterdir())
    # The job's token file was made for this test's HOME: auth was on.
    assert (Path(env["HOME"]) / ".ray" / "auth_token").is_file()
