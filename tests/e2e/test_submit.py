"""`python -m orchestration.submit` against a local Ray head with token auth: a job that fails
fast, Ctrl-C while following, `--no-follow` then `status` and `stop`, and a refused token; and
the Jobs API itself: a job posted without the token is refused (401), the same job with it runs.

No run trains here: the failing job stops at its dataset check, the demo runs are stopped during
their setup, and the token check's job only prints, so the module stays about a minute on two
cores. The head is the session's jobs head (``tests/e2e/conftest.py``).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow
SUBMIT = [sys.executable, "-m", "orchestration.submit"]


@pytest.fixture
def address(jobs_head) -> str:
    """The session's Ray head with the Jobs API (``tests/e2e/conftest.py``)."""
    return jobs_head


@pytest.fixture
def cli(private_env):
    """Run the command in the test's private environment (the session's token, by path);
    check that the token never reaches its output."""
    token = Path(private_env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()

    def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        out = subprocess.run(
            SUBMIT + list(args),
            cwd=REPO,
            env=env or private_env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert token not in out.stdout + out.stderr
        return out

    return run


def test_a_failing_job_exits_1_with_its_error(cli, address, tmp_path):
    bad = tmp_path / "bad.jsonl"  # passes the config check; the job's dataset check fails
    bad.write_text('{"prompt": "1+1=", "label": "2"}\n{"no_prompt": 1}\n')
    overrides = [f"data.source={bad}", "data.strict=true", f"logging.root={tmp_path}"]
    out = cli("--address", address, "--name", "failing", *overrides)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"dashboard:  {address}/#/jobs/failing" in out.stdout
    assert f"error: dataset {bad}, line 2" in out.stdout  # the job's own error line
    assert "job failing: FAILED (Job entrypoint command failed with exit code 2)" in out.stdout
    status = cli("status", "failing", "--address", address)
    assert status.returncode == 0 and "status:      FAILED" in status.stdout
    logs = cli("logs", "failing", "--address", address)
    assert f"error: dataset {bad}, line 2" in logs.stdout


def test_ctrl_c_while_following_stops_the_job(private_env, address, tmp_path):
    token = Path(private_env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    argv = SUBMIT + ["--address", address, "--name", "interrupted", f"logging.root={tmp_path}"]
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        env=private_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # A shell without job control (CI under nohup, `cmd &`) starts its background commands
        # with SIGINT ignored, and Python then installs no KeyboardInterrupt handler: give the
        # command the terminal's default, as a person pressing Ctrl-C has.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("Running entrypoint for job interrupted" in x for x in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, "".join(lines)
    finally:
        proc.kill()
    reader.join(timeout=10)
    out = "".join(lines)
    assert "interrupted: stopping job interrupted" in out
    assert "job interrupted: STOPPED (stopped on Ctrl-C)" in out
    assert token not in out


def test_no_follow_then_status_and_stop(cli, address, tmp_path):
    out = cli("--address", address, "--name", "detached", "--no-follow", f"logging.root={tmp_path}")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines() == [
        "job:        detached",
        f"dashboard:  {address}/#/jobs/detached",
        f"logs:       ray job logs --address {address} --follow detached",
        f"stop:       ray job stop --address {address} detached",
    ]
    status = cli("status", "detached", "--address", address)
    assert status.returncode == 0
    assert "status:      PENDING" in status.stdout or "status:      RUNNING" in status.stdout
    assert (
        "entrypoint:  python -m orchestration.train --config demo logging.progress_bar=false"
        in (status.stdout)
    )
    stop = cli("stop", "detached", "--address", address)
    assert (stop.returncode, stop.stdout) == (0, "job detached: STOPPED\n"), stop.stderr
    assert "status:      STOPPED" in cli("status", "detached", "--address", address).stdout


def test_the_cluster_refuses_a_wrong_or_missing_token(cli, private_env, address, tmp_path):
    wrong = tmp_path / "wrong_token"
    wrong.write_text("not-the-token")
    out = cli("status", "any", "--address", address, "--token-file", str(wrong))
    assert out.returncode == 2
    refused = f"error: the cluster at {address} refused the token from --token-file {wrong} (403)"
    assert refused in out.stderr
    assert "ray get-auth-token" in out.stderr and "not-the-token" not in out.stderr
    no_token = {k: v for k, v in private_env.items() if not k.startswith("RAY_AUTH")}
    out = cli("status", "any", "--address", address, env=no_token)
    assert out.returncode == 2
    assert f"error: the cluster at {address} refused the request (401)" in out.stderr


def test_the_jobs_api_refuses_a_job_without_the_token_and_runs_it_with_it(private_env, address):
    """The same POST /api/jobs/: without a token it is refused with 401 (a wrong token: 403);
    with the bearer token the job runs and succeeds. The accepted post reuses the submission id,
    which Ray refuses for a job that already exists: so the refused posts created nothing."""
    import requests
    from ray.job_submission import JobStatus, JobSubmissionClient

    token = Path(private_env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    bearer = {"Authorization": f"Bearer {token}"}
    job = {"entrypoint": "python -c \"print('raylign-token-ok')\"", "submission_id": "token-gate"}

    refused = requests.post(f"{address}/api/jobs/", json=job, timeout=30)
    assert refused.status_code == 401 and "Missing authentication token" in refused.text
    wrong = {"Authorization": "Bearer not-the-token"}
    forbidden = requests.post(f"{address}/api/jobs/", json=job, headers=wrong, timeout=30)
    assert forbidden.status_code == 403 and "Invalid authentication token" in forbidden.text
    accepted = requests.post(f"{address}/api/jobs/", json=job, headers=bearer, timeout=30)
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["submission_id"] == "token-gate"

    client = JobSubmissionClient(address, headers=bearer)
    deadline = time.monotonic() + 120
    while not (status := client.get_job_status("token-gate")).is_terminal():
        assert time.monotonic() < deadline, f"still {status} after 120 s"
        time.sleep(0.5)
    assert status == JobStatus.SUCCEEDED, client.get_job_info("token-gate").message
    assert "raylign-token-ok" in client.get_job_logs("token-gate")
