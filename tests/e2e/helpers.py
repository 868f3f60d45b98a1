"""Pieces several end-to-end tests share: a local Ray head of their own, and greedy tokens from
a fresh vLLM engine in a process of its own (as a user loading an exported policy would)."""

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

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent  # the environment running the tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_head(root: Path, *options: str, dashboard_port: int = 0) -> Iterator[dict[str, str]]:
    """A Ray head (token auth, as the conftest set up; 2 CPUs; a dashboard, and with it the Jobs
    API, only on ``dashboard_port``) with its own HOME under ``root`` and a short TMPDIR (Ray's
    socket paths must fit in 107 bytes); yields the environment a run joining it needs
    (``RAY_ADDRESS`` set). Stopped on exit."""
    home = root / "home"
    home.mkdir(exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="rl", dir="/tmp")
    env = dict(os.environ, HOME=str(home), TMPDIR=tmp)
    env.pop("RAY_ADDRESS", None)
    ray, gcs = str(VENV / "bin" / "ray"), free_port()
    head = [ray, "start", "--head", f"--port={gcs}", "--num-cpus=2", *options]
    if dashboard_port:
        head += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
    else:
        head += ["--include-dashboard=false"]
    head += ["--disable-usage-stats"]
    subprocess.run(head, env=env, check=True, capture_output=True, timeout=120)
    try:
        yield env | {"RAY_ADDRESS": f"127.0.0.1:{gcs}"}
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)


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
