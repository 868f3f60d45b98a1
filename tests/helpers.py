"""Pieces tests in several packages share: where the repository, its environment and the tests'
cache are, a free port, a Ray head of a test's own (stopped by killing its own processes), and
reading a run's ``metrics.jsonl``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent  # the environment running the tests
# What the tests keep between runs: the converted real checkpoint, compiled kernels.
TEST_CACHE = Path(os.environ.get("RAYLIGN_TEST_CACHE") or "~/.cache/raylign-test").expanduser()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def joining(shared_head: dict[str, str], root: Path) -> dict[str, str]:
    """The environment of runs that join the session's shared head from a module's fixture (the
    function-scoped ``head_env`` cannot serve one): a HOME of their own under ``root``."""
    (root / "home").mkdir(exist_ok=True)
    return os.environ | {"HOME": str(root / "home"), "RAY_ADDRESS": shared_head["RAY_ADDRESS"]}


def history(run_dir: Path) -> list[dict]:
    """A run's ``metrics.jsonl``, one dict per line."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@contextlib.contextmanager
def ray_head(root: Path, *options: str, dashboard_port: int = 0) -> Iterator[dict[str, str]]:
    """A Ray head (token auth, as the conftest set up; 2 CPUs; a dashboard, and with it the Jobs
    API, only on ``dashboard_port``) with its own HOME under ``root`` and a short TMPDIR (Ray's
    socket paths must fit in 107 bytes); yields the environment a run joining it needs
    (``RAY_ADDRESS`` set). Jobs find ``python`` on its PATH: this environment's, first on PATH
    since the conftest. Stopped on exit by killing its own processes (``kill_head``)."""
    home = root / "home"
    home.mkdir(exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="rl", dir="/tmp")
    env = dict(os.environ, HOME=str(home), TMPDIR=tmp)
    env.pop("RAY_ADDRESS", None)
    ray, gcs = str(VENV / "bin" / "ray"), free_port()
    head = [ray, "start", "--head", f"--port={gcs}", "--num-cpus=2", *options]
    # Ports of our own for the head's servers whose defaults are fixed (the dashboard agent's
    # HTTP port serves the Jobs API: two heads on 52365 leave one with "No available agent").
    head += [f"--dashboard-agent-listen-port={free_port()}"]
    head += [f"--ray-client-server-port={free_port()}"]
    if dashboard_port:
        head += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
    else:
        head += ["--include-dashboard=false"]
    head += ["--disable-usage-stats"]
    try:
        subprocess.run(head, env=env, check=True, capture_output=True, timeout=120)
        yield env | {"RAY_ADDRESS": f"127.0.0.1:{gcs}"}
    finally:
        kill_head(tmp, gcs)
        shutil.rmtree(tmp, ignore_errors=True)


def kill_head(tmp: str, gcs_port: int | None = None) -> None:
    """Kill the head started with TMPDIR=``tmp`` (and GCS port ``gcs_port``) and everything it
    started, nothing else (``ray stop`` kills every Ray process on the machine: the session's
    shared head, other users'). Ray's daemons carry ``tmp`` on their command lines, its client
    server the GCS address; workers and job drivers descend from them."""
    import psutil

    def ours(cmdline: list[str]) -> bool:
        if any(tmp in arg for arg in cmdline):
            return True
        return gcs_port is not None and any(
            arg.startswith("--address=") and arg.endswith(f":{gcs_port}") for arg in cmdline
        )

    own = {}
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if p.pid != os.getpid() and ours(p.info["cmdline"] or []):
                own[p.pid] = p
    for p in list(own.values()):
        with contextlib.suppress(psutil.Error):
            own |= {c.pid: c for c in p.children(recursive=True)}
    for p in own.values():
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(list(own.values()), timeout=30)
