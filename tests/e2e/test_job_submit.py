"""The README's first command (minus the install): a local Ray head with token auth and the
dashboard, the demo submitted with `ray job submit`, the reward printed. The job is the whole demo
(GRPO, 200 iterations), so this is also the test that GRPO learns the built-in task
(``test_run.py`` holds the thresholds and the PPO and scale-out runs). And a pipeline of stages
submitted as one job, every stage joining the job's cluster."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.e2e.helpers import REPO, VENV, free_port, ray_head
from tests.e2e.test_run import assert_learned

pytestmark = pytest.mark.slow


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


def test_a_pipeline_runs_as_one_ray_job_its_stages_on_the_jobs_cluster(
    private_env, tmp_path, monkeypatch
):
    # The job's `python` is the one on the head's PATH: this environment's, as with it active.
    monkeypatch.setenv("PATH", f"{VENV / 'bin'}:{private_env['PATH']}")
    port = free_port()
    root, data = tmp_path / "pipeline", tmp_path / "data"
    short = [
        "sft.overrides.iterations=10",
        "dpo.overrides.iterations=4",
        "rs.overrides.iterations=2",
    ]
    with ray_head(tmp_path, dashboard_port=port) as env:
        excludes = [".venv", "runs", ".git", "*.egg-info", "__pycache__", ".pytest_cache", "data"]
        submit = [str(VENV / "bin" / "ray"), "job", "submit", f"--address=http://127.0.0.1:{port}"]
        submit += ["--working-dir=.", "--runtime-env-json", json.dumps({"excludes": excludes})]
        pipeline = ["python", "-m", "orchestration.pipeline", "--config=methods"]
        pipeline += [f"root={root}", f"demo_data={data}", *[f"stages.{s}" for s in short]]
        out = subprocess.run(
            [*submit, "--", *pipeline],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
    console = out.stdout + out.stderr
    assert out.returncode == 0 and "succeeded" in console, console[-6000:]
    record = json.loads((root / "pipeline.json").read_text())
    assert {name: s["status"] for name, s in record["stages"].items()} == dict.fromkeys(
        ("sft", "dpo", "rs"), "done"
    )
    assert console.count("ray: joined ") == 3  # each stage on the job's cluster, none its own
    assert "pipeline methods: done" in console
