"""Shared fixtures: the tiny model, and a private environment for anything that starts Ray or
vLLM (its own HOME for Ray's auth token, its own short TMPDIR for sockets)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from orchestration.data import addition_corpus
from orchestration.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny random Qwen2 model and tokenizer for the addition task (operands 0..4)."""
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"), addition_corpus(4))


@pytest.fixture
def private_env(monkeypatch, tmp_path) -> dict[str, str]:
    """HOME, TMPDIR and Ray auth set for this test only; returns the environment for
    subprocesses. TMPDIR is short: Ray's socket paths must fit in 107 bytes."""
    tmp = tempfile.mkdtemp(prefix="rl", dir="/tmp")
    home = tmp_path / "home"
    home.mkdir()
    for key, value in {"HOME": str(home), "TMPDIR": tmp, "RAY_AUTH_MODE": "token"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield dict(os.environ)
    shutil.rmtree(tmp, ignore_errors=True)
