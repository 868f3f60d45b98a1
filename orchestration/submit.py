"""Submit a run to a Ray cluster as a job, follow its logs, stop it.

    python -m orchestration.submit --config demo iterations=50     # same as `... submit run ...`
    python -m orchestration.submit run --address http://head:8265 --no-follow --config my.yaml
    python -m orchestration.submit status|logs|stop JOB_ID [--address URL]

``run`` validates the config here first (a bad one never reaches the cluster), uploads the working
directory through Ray's Job SDK and runs ``python -m orchestration.train`` there, then follows the
job's logs until it ends: exit 0 if it succeeded, 1 if not. Ctrl-C stops the job (exit 130).

The cluster is ``--address``, else ``RAY_API_SERVER_ADDRESS`` or ``RAY_ADDRESS``, else the local
dashboard. Ray's token (clusters started with ``RAY_AUTH_MODE=token``) is read as Ray reads it:
``--token-file``, ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``, and sent as
an ``Authorization: Bearer`` header. It is never printed and never sent to the job.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shlex
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import requests
from ray.exceptions import AuthenticationError
from ray.job_submission import JobDetails, JobStatus, JobSubmissionClient

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
EXCLUDES = [
    ".venv",
    "runs",
    ".git",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".hypothesis",
    ".ruff_cache",
    "*.safetensors",
    "*.bin",
    "*.pt",
]
HTTP_TIMEOUT_S = (10.0, 120.0)  # (connect, read); the read covers the working dir's upload
STOP_TIMEOUT_S = 60.0  # Ray sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (3 s)
POLL_S = 0.5
STATUS_EVERY_S = 5.0  # while following logs, how often the job's status is checked
STREAM_GRACE_S = 10.0  # how long the log stream may trail the job's end
HOW_TO_GET_A_TOKEN = (
    "on the head node `ray get-auth-token` prints the cluster's token (it is also in the head's "
    "~/.ray/auth_token); pass it with --token-file PATH, RAY_AUTH_TOKEN_PATH=PATH or "
    "RAY_AUTH_TOKEN"
)


class SubmitError(Exception):
    """A problem the user can fix (config, address, token, job name); exits 2 with the message."""


# ------------------------------------------------------------------------------ the cluster


@dataclass(frozen=True)
class Token:
    """Ray's auth token and where it came from (the source may be shown; the value never)."""

    value: str
    source: str

    def __repr__(self) -> str:
        return f"Token(source={self.source!r})"


def read_token(token_file: str | None) -> Token | None:
    """The token from ``--token-file``, else where Ray's own client looks, in Ray's order."""
    env_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if token_file:
        candidates = [(Path(token_file).expanduser(), f"--token-file {token_file}", True)]
    elif os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return Token(os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN")
    elif env_path:
        candidates = [(Path(env_path).expanduser(), f"RAY_AUTH_TOKEN_PATH={env_path}", True)]
    else:
        path = Path.home() / ".ray" / "auth_token"
        candidates = [(path, str(path), False)]
    for path, source, required in candidates:
        try:
            value = path.read_text().strip()
        except FileNotFoundError:
            value = ""
        if value:
            return Token(value, source)
        if required:
            raise SubmitError(f"{source}: the file is missing or empty")
    return None


def resolve_address(address: str | None) -> str:
    """``--address``, else ``RAY_API_SERVER_ADDRESS`` or ``RAY_ADDRESS``, else the local one."""
    found = (
        address
        or os.environ.get("RAY_API_SERVER_ADDRESS")
        or os.environ.get("RAY_ADDRESS")
        or DEFAULT_ADDRESS
    )
    return found.rstrip("/")


class Client(JobSubmissionClient):
    """The Job SDK client with a finite timeout on every HTTP request (the SDK sets none) and
    its errors turned into messages that say what to do."""

    def __init__(self, address: str, token: Token | None):
        self._token_source = token.source if token else None
        headers = {"Authorization": f"Bearer {token.value}"} if token else {}
        # The SDK lets these variables override the address it is given; ours was chosen
        # from them already, so hide them while it resolves.
        with _without_env("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            try:
                super().__init__(address, headers=headers)
            except AuthenticationError:
                # Raised before any request (those raise SubmitError): RAY_AUTH_MODE=token is set
                # here, so the SDK looked for a token itself and found none either.
                raise SubmitError(
                    f"RAY_AUTH_MODE=token is set but no token was found for {address}; "
                    f"{HOW_TO_GET_A_TOKEN}"
                ) from None

    def _do_request(self, method: str, endpoint: str, **kwargs):
        kwargs.setdefault("timeout", HTTP_TIMEOUT_S)
        try:
            return super()._do_request(method, endpoint, **kwargs)
        except AuthenticationError as e:
            raise SubmitError(self._auth_message(e)) from None
        except requests.exceptions.RequestException as e:
            raise SubmitError(
                f"cannot reach the Ray dashboard at {self._address} ({type(e).__name__}); is the "
                "cluster up, and is this its dashboard address (--address or RAY_ADDRESS)?"
            ) from None

    def _auth_message(self, error: AuthenticationError) -> str:
        # Ray answers 401 when no token arrived and 403 when the token is wrong.
        where = f"the cluster at {self._address}"
        if not error.message.startswith("Authentication required"):
            return (
                f"{where} refused the token from {self._token_source} (403): it is not this "
                f"cluster's token; {HOW_TO_GET_A_TOKEN}"
            )
        if self._token_source is None:
            return (
                f"{where} refused the request (401): it needs a token and none was found; "
                f"{HOW_TO_GET_A_TOKEN}"
            )
        return (
            f"{where} refused the request (401): the token from {self._token_source} did not "
            "reach it (does a proxy drop the Authorization header?)"
        )


@contextlib.contextmanager
def _without_env(*names: str) -> Iterator[None]:
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def job_info(client: Client, job_id: str) -> JobDetails:
    """The job's details; an unknown id is a SubmitError."""
    try:
        return client.get_job_info(job_id)
    except RuntimeError as e:
        if "404" in str(e):
            raise SubmitError(
                f"no job {job_id!r} on the cluster at {client.get_address()}"
            ) from None
        raise


def wait_until_terminal(client: Client, job_id: str, timeout_s: float) -> JobDetails:
    """The job's details once it has ended, or as they are after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    info = job_info(client, job_id)
    while not info.status.is_terminal() and time.monotonic() < deadline:
        time.sleep(POLL_S)
        info = job_info(client, job_id)
    return info


def stop_and_wait(client: Client, job_id: str) -> JobDetails:
    """Ask the job to stop and wait (at most STOP_TIMEOUT_S) until it has."""
    client.stop_job(job_id)
    return wait_until_terminal(client, job_id, STOP_TIMEOUT_S)


async def _print_logs(client: Client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def follow(client: Client, job_id: str) -> JobDetails:
    """Print the job's logs as they come until it ends; its final details.

    The log stream (a websocket) runs in a daemon thread; this thread only waits, checking the
    job's status every few seconds, so Ctrl-C always lands here at once (KeyboardInterrupt) and
    a stream that stalls cannot outlive its job by more than ``STREAM_GRACE_S``. Unbounded by
    design otherwise: a run takes as long as it takes.
    """
    done = threading.Event()

    def stream() -> None:
        try:
            asyncio.run(_print_logs(client, job_id))
        except (aiohttp.ClientError, RuntimeError) as e:
            print(f"warning: the log stream broke ({e})", file=sys.stderr, flush=True)
        finally:
            done.set()

    threading.Thread(target=stream, name="job-logs", daemon=True).start()
    ended_at = None
    while not done.wait(STATUS_EVERY_S):
        if ended_at is None and job_info(client, job_id).status.is_terminal():
            ended_at = time.monotonic()  # let the stream deliver the last lines
        if ended_at is not None and time.monotonic() - ended_at > STREAM_GRACE_S:
            break
    # The stream ends when the job does; its status can trail by a moment.
    return wait_until_terminal(client, job_id, timeout_s=10)


def headline(info: JobDetails) -> str:
    """The first line of the job's message, without the log tail Ray appends to a failure's."""
    lines = (info.message or "").strip().splitlines()
    return lines[0].split(", last available logs")[0] if lines else ""


def report(info: JobDetails) -> int:
    """Print the job's final line; the exit code: 0 if it succeeded, 1 if not."""
    line = f"job {info.submission_id}: {info.status.value}"
    message = headline(info)
    print(line + (f" ({message})" if message else ""), flush=True)
    return 0 if info.status == JobStatus.SUCCEEDED else 1


# ------------------------------------------------------------------------------ submitting


@dataclass(frozen=True)
class JobSpec:
    """What ``run`` sends: a validated config turned into a job."""

    submission_id: str
    entrypoint: str
    runtime_env: dict


def job_spec(config: str, overrides: list[str], working_dir: str, name: str | None) -> JobSpec:
    """Validate the config as the job will see it and build the job.

    The job runs in the uploaded copy of ``working_dir``, so a YAML config must lie inside it
    (and is passed relative to it), and relative paths in the config are checked from it.

    Raises:
        SubmitError: the working dir or the config file's place is wrong.
        ConfigError: the config is invalid.
    """
    # Imported here: the config pulls in torch (seconds), which stop, logs and status never need.
    from orchestration.config import load_config, presets

    root = Path(working_dir).expanduser().resolve()
    if not root.is_dir():
        raise SubmitError(f"--working-dir {working_dir}: not a directory")
    config_arg = config
    if config not in presets() and Path(config).is_file():
        path = Path(config).resolve()
        if not path.is_relative_to(root):
            raise SubmitError(
                f"--config {config} is outside the working directory {root}, which is what the "
                "job gets: move the file into it, or point --working-dir at a directory holding "
                "both the code and the config"
            )
        config_arg = path.relative_to(root).as_posix()
    with _cwd(root):
        load_config(config_arg, overrides)
    command = ["python", "-m", "orchestration.train", "--config", config_arg]
    command += ["logging.progress_bar=false", *overrides]
    stem = Path(config_arg).stem
    return JobSpec(
        submission_id=name or f"raylign-{stem}-{time.strftime('%Y%m%d-%H%M%S')}",
        entrypoint=shlex.join(command),
        runtime_env={"working_dir": str(root), "excludes": list(EXCLUDES)},
    )


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def cmd_run(args: argparse.Namespace) -> int:
    """Validate, submit, follow; the exit code (see ``run --help``)."""
    from orchestration.config import ConfigError

    try:
        spec = job_spec(args.config, args.overrides, args.working_dir, args.name)
    except ConfigError as e:
        note = ""
        if Path(args.working_dir).resolve() != Path.cwd():
            note = f"\n(paths in the config are relative to --working-dir {args.working_dir})"
        raise SubmitError(f"{e}{note}") from None
    client = Client(resolve_address(args.address), read_token(args.token_file))
    address = client.get_address()  # the dashboard's URL, also when given a GCS address
    try:
        job_id = client.submit_job(
            entrypoint=spec.entrypoint,
            submission_id=spec.submission_id,
            runtime_env=spec.runtime_env,
            metadata={"raylign_config": args.config},
        )
    except RuntimeError as e:
        raise SubmitError(f"the cluster at {address} did not take the job: {e}") from None
    print(f"job:        {job_id}")
    print(f"dashboard:  {address}/#/jobs/{job_id}")
    print(f"logs:       ray job logs --address {address} --follow {job_id}")
    print(f"stop:       ray job stop --address {address} {job_id}", flush=True)
    if args.no_follow:
        return 0
    try:
        info = follow(client, job_id)
    except KeyboardInterrupt:
        if args.detach_on_interrupt:
            print(f"\ninterrupted: job {job_id} keeps running", flush=True)
            return 130
        print(f"\ninterrupted: stopping job {job_id} ...", flush=True)
        info = stop_and_wait(client, job_id)
        if not info.status.is_terminal():
            print(f"error: job {job_id} is still {info.status.value} after the stop", flush=True)
            return 1
        print(f"job {job_id}: {info.status.value} (stopped on Ctrl-C)", flush=True)
        return 130
    return report(info)


def cmd_stop(args: argparse.Namespace) -> int:
    """Stop the job and wait until it has; 0 once it has ended, 1 if it has not in time."""
    client = Client(resolve_address(args.address), read_token(args.token_file))
    job_info(client, args.job_id)  # an unknown id fails here, by name
    info = stop_and_wait(client, args.job_id)
    print(f"job {args.job_id}: {info.status.value}", flush=True)
    return 0 if info.status.is_terminal() else 1


def cmd_logs(args: argparse.Namespace) -> int:
    """Print the job's logs so far, or follow them (then exit as ``run`` does)."""
    client = Client(resolve_address(args.address), read_token(args.token_file))
    job_info(client, args.job_id)
    if args.follow:
        return report(follow(client, args.job_id))
    print(client.get_job_logs(args.job_id), end="", flush=True)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print the job's status, message, entrypoint and exit code."""
    client = Client(resolve_address(args.address), read_token(args.token_file))
    info = job_info(client, args.job_id)
    print(f"job:         {info.submission_id}")
    print(f"status:      {info.status.value}")
    print(f"message:     {headline(info)}")
    print(f"entrypoint:  {info.entrypoint}")
    if info.driver_exit_code is not None:
        print(f"exit code:   {info.driver_exit_code}")
    return 0


# ------------------------------------------------------------------------------ command line

COMMANDS = ("run", "stop", "logs", "status")
EXAMPLES = """examples:
  python -m orchestration.submit --config demo iterations=50
  python -m orchestration.submit run --address http://head:8265 --no-follow --config my.yaml
  python -m orchestration.submit logs --follow JOB_ID
  python -m orchestration.submit stop JOB_ID

`python -m orchestration.submit run --help` lists the options of run."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; with no command, ``run`` is meant."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv.insert(0, "run")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--address",
        help="the cluster's dashboard URL (default: RAY_API_SERVER_ADDRESS or RAY_ADDRESS, "
        f"else {DEFAULT_ADDRESS})",
    )
    common.add_argument(
        "--token-file",
        metavar="PATH",
        help="Ray's auth token (default: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)",
    )
    parser = argparse.ArgumentParser(
        prog="python -m orchestration.submit",
        description="Run Raylign as a job on a Ray cluster through the Job SDK. `run` is the "
        "main command and the default: `python -m orchestration.submit --config demo` is "
        "`python -m orchestration.submit run --config demo`.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser(
        "run",
        parents=[common],
        help="validate the config, submit the run, follow its logs (the default command)",
        description="Validate the config here, upload the working directory, run "
        "`python -m orchestration.train` as a job and follow its logs until it ends. Exit 0 if "
        "it succeeded, 1 if it failed or was stopped, 2 if it could not be submitted, 130 on "
        "Ctrl-C. Options come before the overrides.",
    )
    run.add_argument(
        "--config",
        default="demo",
        help="a preset (orchestration/presets/<name>.yaml: demo, ...) or a YAML file inside the "
        "working directory (default: demo)",
    )
    run.add_argument("--name", help="the job's submission id (default: raylign-<config>-<time>)")
    run.add_argument(
        "--working-dir",
        default=".",
        help="the directory uploaded as the job's working directory: the code and any config or "
        "data it names by relative path (default: .; .venv, runs, .git and weights are left out)",
    )
    run.add_argument("--no-follow", action="store_true", help="return once the job is submitted")
    run.add_argument(
        "--detach-on-interrupt",
        action="store_true",
        help="on Ctrl-C leave the job running (default: stop it)",
    )
    run.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. iterations=50"
    )
    for name, text in (
        ("stop", "stop a job and wait until it has stopped"),
        ("logs", "print a job's logs"),
        ("status", "print a job's status"),
    ):
        cmd = sub.add_parser(name, parents=[common], help=text, description=text)
        cmd.add_argument("job_id", metavar="JOB_ID", help="the submission id `run` printed")
        if name == "logs":
            cmd.add_argument("--follow", action="store_true", help="follow until the job ends")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the command; the exit code."""
    args = parse_args(argv)
    # The SDK logs every packaging step at INFO (its modules set their own levels), and warns
    # that Ray now leaves out .git and .venv, which EXCLUDES names anyway; keep the rest.
    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)
    command = {"run": cmd_run, "stop": cmd_stop, "logs": cmd_logs, "status": cmd_status}
    try:
        return command[args.command](args)
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
