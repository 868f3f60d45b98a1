"""`python -m orchestration.submit` without a cluster: config checks before any request, the
job it builds, where the token comes from and that it is never shown, and what the command
says when the dashboard refuses the token or does not answer (a stand-in HTTP server)."""

from __future__ import annotations

import http.server
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray.job_submission import JobStatus

from orchestration import submit
from orchestration.submit import SubmitError, Token, job_spec, main, parse_args, read_token

REPO = Path(__file__).resolve().parents[2]
TOKEN = "f3c9a1b2c3d4e5f60718293a4b5c6d7e"


@pytest.fixture
def no_cluster(monkeypatch):
    """Fail the test if the command tries to reach a cluster."""

    def refuse(*args, **kwargs):
        raise AssertionError("the command contacted the cluster")

    monkeypatch.setattr(submit, "Client", refuse)


@pytest.fixture
def token_file(tmp_path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


# ------------------------------------------------------------------------------ before a request


@pytest.mark.unit
def test_a_bad_config_exits_2_before_contacting_the_cluster(no_cluster, capsys):
    assert main(["--working-dir", str(REPO), "learner.lrr=1e-3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid config:") and "did you mean 'lr'?" in err


@pytest.mark.unit
def test_a_config_outside_the_working_dir_is_refused(no_cluster, tmp_path, capsys):
    (tmp_path / "code").mkdir()
    (tmp_path / "run.yaml").write_text("iterations: 2\n")
    argv = ["run", "--working-dir", str(tmp_path / "code"), "--config", str(tmp_path / "run.yaml")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "outside the working directory" in err and "--working-dir" in err


@pytest.mark.unit
def test_the_job_runs_train_on_the_config_as_the_uploaded_copy_names_it(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "run.yaml").write_text("iterations: 2\n")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "1+1=", "label": "2"}\n')
    override = "reward.functions=[{name: exact_integer}]"
    monkeypatch.chdir(tmp_path / "configs")  # relative paths are the working dir's, not ours
    spec = job_spec("run.yaml", [override, "data.source=prompts.jsonl"], "..", None)
    assert shlex.split(spec.entrypoint) == [
        "python",
        "-m",
        "orchestration.train",
        "--config",
        "configs/run.yaml",
        "logging.progress_bar=false",
        override,
        "data.source=prompts.jsonl",
    ]
    assert re.fullmatch(r"raylign-run-\d{8}-\d{6}", spec.submission_id)
    assert spec.runtime_env["working_dir"] == str(tmp_path)
    assert {".venv", "runs", ".git", "*.safetensors"} <= set(spec.runtime_env["excludes"])
    assert TOKEN not in repr(spec)
    named = job_spec("demo", [], str(REPO), "my-run")
    assert named.submission_id == "my-run" and "--config demo " in named.entrypoint


@pytest.mark.unit
def test_relative_paths_are_checked_from_the_working_dir(tmp_path, monkeypatch, no_cluster, capsys):
    monkeypatch.chdir(tmp_path)
    Path("prompts.jsonl").write_text('{"prompt": "1+1=", "label": "2"}\n')
    assert main(["--working-dir", str(REPO), "data.source=prompts.jsonl"]) == 2
    err = capsys.readouterr().err
    assert "data.source:" in err and "'prompts.jsonl' does not exist" in err
    assert "relative to --working-dir" in err


@pytest.mark.unit
def test_with_no_command_run_is_meant():
    assert parse_args([]).command == "run"
    args = parse_args(["--config", "demo", "--no-follow", "iterations=3"])
    assert (args.command, args.config, args.no_follow, args.overrides) == (
        "run",
        "demo",
        True,
        ["iterations=3"],
    )
    assert parse_args(["iterations=3"]).overrides == ["iterations=3"]
    assert parse_args(["stop", "job-1", "--address", "http://h:1"]).job_id == "job-1"


@pytest.mark.unit
def test_the_address_comes_from_the_flag_then_the_environment(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert submit.resolve_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265/")
    assert submit.resolve_address(None) == "http://head:8265"
    assert submit.resolve_address("http://other:1") == "http://other:1"


@pytest.mark.unit
def test_the_token_is_read_in_rays_order_and_never_shown(tmp_path, monkeypatch, token_file):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("home-token")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert read_token(None).value == "home-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert read_token(None) == Token(TOKEN, f"RAY_AUTH_TOKEN_PATH={token_file}")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert read_token(None).value == "env-token"
    assert read_token(str(token_file)).source == f"--token-file {token_file}"
    assert TOKEN not in repr(read_token(str(token_file)))
    with pytest.raises(SubmitError, match="missing or empty"):
        read_token(str(tmp_path / "nope"))
    (home / ".ray" / "auth_token").unlink()
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    assert read_token(None) is None


# ------------------------------------------------------------------------- a stand-in dashboard


class Dashboard(http.server.ThreadingHTTPServer):
    """Answers every request with ``status``; keeps the Authorization headers it was sent."""

    def __init__(self, status: int, body: str):
        self.status, self.body, self.authorization = status, body, []
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.authorization.append(self.headers.get("Authorization"))
        body = self.server.body.encode()
        self.send_response(self.server.status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def dashboard(request):
    server = Dashboard(*request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.unit
@pytest.mark.parametrize(
    "dashboard", [(403, "Forbidden: Invalid authentication token")], indirect=True
)
def test_a_wrong_token_exits_2_saying_how_to_get_the_right_one(
    dashboard, token_file, monkeypatch, capsys
):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")  # --address wins over it
    assert (
        main(["status", "job-1", "--address", dashboard.url, "--token-file", str(token_file)]) == 2
    )
    out, err = capsys.readouterr()
    assert f"the cluster at {dashboard.url} refused the token from --token-file" in err
    assert "(403)" in err and "ray get-auth-token" in err
    assert TOKEN not in out + err
    assert dashboard.authorization == [f"Bearer {TOKEN}"]


@pytest.mark.component  # the command in a child process
@pytest.mark.parametrize(
    "dashboard", [(401, "Unauthorized: Missing authentication token")], indirect=True
)
def test_no_token_exits_2_saying_how_to_get_one(dashboard, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestration.submit",
            "status",
            "job-1",
            "--address",
            dashboard.url,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert "refused the request (401): it needs a token and none was found" in out.stderr
    assert "--token-file PATH" in out.stderr
    assert dashboard.authorization == [None]


@pytest.mark.unit
def test_a_dashboard_that_does_not_answer_times_out(monkeypatch, token_file, capsys):
    monkeypatch.setattr(submit, "HTTP_TIMEOUT_S", (1.0, 0.5))
    with socket.socket() as listener:  # accepts connections (the backlog) and never replies
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        start = time.monotonic()
        assert main(["status", "job-1", "--address", url, "--token-file", str(token_file)]) == 2
    assert time.monotonic() - start < 10
    assert f"cannot reach the Ray dashboard at {url} (ReadTimeout)" in capsys.readouterr().err


# ------------------------------------------------------------------------------ Ctrl-C


class FakeClient:
    """Takes the job, then reports it as the stop left it."""

    def __init__(self, address, token):
        self.address, self.stopped = address, []
        FakeClient.last = self

    def submit_job(self, *, submission_id, **kwargs):
        return submission_id

    def stop_job(self, job_id):
        self.stopped.append(job_id)
        return True

    def get_job_info(self, job_id):
        status = JobStatus.STOPPED if self.stopped else JobStatus.RUNNING
        return SimpleNamespace(submission_id=job_id, status=status, message="")

    def get_address(self):
        return self.address


@pytest.mark.unit
@pytest.mark.parametrize("detach", [False, True])
def test_ctrl_c_stops_the_job_unless_told_to_detach(detach, monkeypatch, capsys):
    def interrupted(client, job_id):
        raise KeyboardInterrupt

    monkeypatch.setattr(submit, "Client", FakeClient)
    monkeypatch.setattr(submit, "follow", interrupted)
    argv = ["--working-dir", str(REPO), "--name", "job-1", "--address", "http://h:1"]
    assert main(argv + (["--detach-on-interrupt"] if detach else [])) == 130
    out = capsys.readouterr().out
    assert "job:        job-1\ndashboard:  http://h:1/#/jobs/job-1\n" in out
    if detach:
        assert FakeClient.last.stopped == [] and "job-1 keeps running" in out
    else:
        assert FakeClient.last.stopped == ["job-1"] and "job job-1: STOPPED" in out


@pytest.mark.unit
def test_the_final_line_names_the_status_and_the_first_line_of_the_message(capsys):
    failed = SimpleNamespace(
        submission_id="job-1",
        status=JobStatus.FAILED,
        message="Job entrypoint command failed with exit code 2, last available logs (...):\nx",
    )
    assert submit.report(failed) == 1
    out = capsys.readouterr().out
    assert out == "job job-1: FAILED (Job entrypoint command failed with exit code 2)\n"
    done = SimpleNamespace(submission_id="job-1", status=JobStatus.SUCCEEDED, message=None)
    assert submit.report(done) == 0
