"""Where a model path loads from: a directory as it is; a hub name from the hub when it answers,
from the local cache when it does not, and a clear error in seconds when neither."""

from __future__ import annotations

import http.server
import shutil
import socket
import threading
import time

import pytest
from huggingface_hub import constants

from orchestration.checks import InputError, locate_model

pytestmark = pytest.mark.unit  # pure code in this process

NAME = "someorg/some-model"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A private cache, and a hub endpoint that is whatever the test serves (none by default)."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    return tmp_path


def serve(monkeypatch, status: int) -> http.server.HTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 - the stdlib's name
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    return server


def cache_copy(root, tiny_model) -> str:
    """The hub cache's layout for NAME: refs/main -> snapshots/<commit>/ (config.json ...)."""
    repo = root / "cache" / f"models--{NAME.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_model, repo / "snapshots" / commit)
    return str(repo / "snapshots" / commit)


def test_a_local_directory_is_used_as_it_is(hub, tiny_model):
    assert locate_model("model.path", tiny_model) == tiny_model


def test_no_hub_and_no_cached_copy_fails_fast_saying_how_to_use_a_local_copy(hub):
    start = time.perf_counter()
    with pytest.raises(InputError) as error:
        locate_model("model.path", NAME)
    assert time.perf_counter() - start < 10
    message = str(error.value)
    assert message.startswith(f"model.path {NAME!r} is neither a local directory nor reachable")
    assert f"huggingface-cli download {NAME} --local-dir <dir>" in message
    assert "set model.path=<dir>" in message


def test_no_hub_but_a_cached_copy_uses_the_copy(hub, tiny_model, capsys):
    snapshot = cache_copy(hub, tiny_model)
    assert locate_model("model.path", NAME) == snapshot
    assert "the hub is not reachable" in capsys.readouterr().out


def test_offline_mode_skips_the_network(hub, tiny_model, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match="HF_HUB_OFFLINE is set"):
        locate_model("reward.models[rm].path", NAME)
    snapshot = cache_copy(hub, tiny_model)
    assert locate_model("model.path", NAME) == snapshot


@pytest.mark.parametrize(("status", "located"), [(200, NAME), (401, NAME), (404, None)])
def test_a_hub_that_answers_decides(hub, monkeypatch, status, located):
    server = serve(monkeypatch, status)
    try:
        if located is None:
            with pytest.raises(InputError, match="no such model on the Hugging Face hub"):
                locate_model("model.path", NAME)
        else:  # found, or gated/private (a token may open it): loaded by name
            assert locate_model("model.path", NAME) == located
    finally:
        server.shutdown()
