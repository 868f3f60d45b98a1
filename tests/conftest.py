"""Shared fixtures: the tiny model, and a private environment for anything that starts Ray or
vLLM (its own HOME for Ray's auth token, its own short TMPDIR for sockets); the tiers
(``tests/tiers.py``)."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile


def _ray_auth_for_this_session() -> None:
    """Token auth on, with a token of our own. Set before anything imports ray: Ray's Python side
    reads RAY_AUTH_MODE once, at import, while the processes it starts read it when they start."""
    home = tempfile.mkdtemp(prefix="raylign-auth-")
    token = os.path.join(home, "auth_token")
    with open(token, "w") as f:
        f.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = token


_ray_auth_for_this_session()

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
