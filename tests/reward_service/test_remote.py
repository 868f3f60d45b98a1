"""The remote reward client against fakes of the other team's server: tiny HTTP servers on
127.0.0.1 in threads of this process. The client is the subject; the fakes misbehave on purpose."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from reward_service.remote import RemoteRewardClient, RemoteSpec

pytestmark = pytest.mark.unit  # pure code in this process

TOKEN_ENV = "RAYLIGN_TEST_REWARD_TOKEN"
TOKEN = "s3cret-token-for-tests"


@dataclass
class Hit:
    """One request the fake received."""

    headers: dict[str, str]
    body: dict


Reply = tuple[int, dict[str, str], bytes]
"""(status, headers, body) the fake sends back."""


@dataclass
class FakeServer:
    """A fake reward server: ``reply(hit, n)`` answers the n-th request (0-based)."""

    reply: Callable[[Hit, int], Reply]
    hits: list[Hit] = field(default_factory=list)
    url: str = ""


def json_reply(payload: object, status: int = 200) -> Reply:
    return status, {"Content-Type": "application/json"}, json.dumps(payload).encode()


def echo_scores(hit: Hit, n: int) -> Reply:
    """Scores each sample with float(label): a correct server."""
    return json_reply({"scores": [float(s["label"]) for s in hit.body["samples"]]})


@pytest.fixture
def serve_fake() -> Iterator[Callable[[Callable[[Hit, int], Reply]], FakeServer]]:
    """Starts fakes; all stop at teardown (a hanging handler is released by ``stop``)."""
    servers: list[ThreadingHTTPServer] = []
    stop = threading.Event()

    def start(reply: Callable[[Hit, int], Reply]) -> FakeServer:
        fake = FakeServer(reply)
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server hook's name
                length = int(self.headers.get("Content-Length", "0"))
                hit = Hit(dict(self.headers), json.loads(self.rfile.read(length) or b"{}"))
                with lock:
                    n = len(fake.hits)
                    fake.hits.append(hit)
                status, headers, body = fake.reply(hit, n)
                if status == 0:  # hang: answer nothing until the test ends
                    stop.wait(30)
                    return
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if "X-Trickle" in headers:  # one byte per 0.1 s, each read well within timeout
                    for i in range(len(body)):
                        self.wfile.write(body[i : i + 1])
                        self.wfile.flush()
                        if stop.wait(0.1):
                            return
                else:
                    self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        servers.append(server)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        fake.url = f"http://127.0.0.1:{server.server_address[1]}/score"
        return fake

    yield start
    stop.set()
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def token(monkeypatch) -> str:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    return TOKEN


def client_for(url: str, **overrides: object) -> RemoteRewardClient:
    spec = {
        "name": "fake",
        "url": url,
        "token_env": TOKEN_ENV,
        "connect_timeout_s": 0.3,
        "read_timeout_s": 0.3,
        "backoff_s": 0.01,
    }
    return RemoteRewardClient(RemoteSpec(**(spec | overrides)))


def samples(n: int) -> tuple[list[str], list[str], list[str | None]]:
    return [f"p{i}" for i in range(n)], [f"r{i}" for i in range(n)], [str(i) for i in range(n)]


# --- the happy path ---------------------------------------------------------------------------


def test_scores_are_parsed_in_order_and_the_bearer_token_is_sent(serve_fake, token):
    fake = serve_fake(echo_scores)
    with client_for(fake.url) as client:
        scores, metrics = client.score(["3+4=", "1+1="], ["7", "3"], ["1.0", "0.1"])
    assert scores == [1.0, 0.1]
    assert metrics == {
        "reward/fake/unscorable": 0.0,
        "reward/fake/failed_batches": 0.0,
        "reward/fake/retries": 0.0,
    }
    [hit] = fake.hits
    assert hit.headers["Authorization"] == f"Bearer {TOKEN}"
    assert hit.body == {
        "samples": [
            {"prompt": "3+4=", "response": "7", "label": "1.0"},
            {"prompt": "1+1=", "response": "3", "label": "0.1"},
        ]
    }


def test_150_samples_go_out_as_3_requests_of_at_most_64_and_come_back_in_order(serve_fake, token):
    fake = serve_fake(echo_scores)
    with client_for(fake.url) as client:
        scores, _ = client.score(*samples(150))
    assert [len(h.body["samples"]) for h in fake.hits] == [64, 64, 22]
    assert scores == [float(i) for i in range(150)]


def test_null_and_nan_scores_make_only_those_samples_unscorable(serve_fake, token):
    # json.dumps writes NaN and Infinity as bare literals, as Python servers do
    fake = serve_fake(lambda hit, n: json_reply({"scores": [None, math.nan, math.inf, 0.5]}))
    with client_for(fake.url) as client:
        scores, metrics = client.score(*samples(4))
    assert scores == [None, None, None, 0.5]
    assert metrics["reward/fake/unscorable"] == 3.0
    assert metrics["reward/fake/failed_batches"] == 0.0


# --- failures: retried, not retried, never raised ---------------------------------------------


def test_503_twice_then_200_gives_the_scores_after_2_retries(serve_fake, token):
    fake = serve_fake(
        lambda hit, n: json_reply({"error": "busy"}, 503) if n < 2 else echo_scores(hit, n)
    )
    with client_for(fake.url) as client:
        scores, metrics = client.score(*samples(3))
    assert scores == [0.0, 1.0, 2.0]
    assert metrics["reward/fake/retries"] == 2.0
    assert metrics["reward/fake/failed_batches"] == 0.0
    assert len(fake.hits) == 3


def test_429_is_retried_until_the_retries_run_out(serve_fake, token):
    fake = serve_fake(lambda hit, n: json_reply({"error": "slow down"}, 429))
    with client_for(fake.url, max_retries=3) as client:
        scores, metrics = client.score(*samples(2))
    assert scores == [None, None]
    assert len(fake.hits) == 4  # the first attempt and 3 retries
    assert metrics["reward/fake/retries"] == 3.0
    assert metrics["reward/fake/failed_batches"] == 1.0


def test_a_hanging_server_gives_all_none_within_the_timeouts(serve_fake, token):
    fake = serve_fake(lambda hit, n: (0, {}, b""))
    with client_for(fake.url, max_retries=2) as client:
        started = time.monotonic()
        scores, metrics = client.score(*samples(5))
        elapsed = time.monotonic() - started
    assert scores == [None] * 5
    assert metrics["reward/fake/unscorable"] == 5.0
    assert metrics["reward/fake/failed_batches"] == 1.0
    assert metrics["reward/fake/retries"] == 2.0
    # 3 attempts x 0.3 s read timeout, plus 0.01 + 0.02 s of backoff; generous slack for CI
    assert 0.9 <= elapsed < 0.9 + 1.5


def test_a_server_trickling_its_body_is_cut_off_at_the_read_timeout(serve_fake, token):
    body = json.dumps({"scores": [1.0, 1.0]}).encode()
    fake = serve_fake(lambda hit, n: (200, {"X-Trickle": "1"}, body))
    with client_for(fake.url, max_retries=0) as client:
        started = time.monotonic()
        scores, metrics = client.score(*samples(2))
        elapsed = time.monotonic() - started
    assert scores == [None, None]
    assert metrics["reward/fake/failed_batches"] == 1.0
    assert elapsed < len(body) * 0.1 / 2  # cut off, not read to the end


def test_an_unreachable_server_gives_all_none(token):
    # port 9 (discard) on loopback: nothing listens, the connection is refused at once
    with client_for("http://127.0.0.1:9/score", max_retries=1) as client:
        scores, metrics = client.score(*samples(2))
    assert scores == [None, None]
    assert metrics["reward/fake/retries"] == 1.0


@pytest.mark.parametrize(
    "body",
    [
        b'{"results": [1.0, 1.0]}',  # missing key
        b'{"scores": [1.0]}',  # wrong length
        b'{"scores": ["1.0", "0.0"]}',  # strings, not numbers
        b'{"scores": [true, false]}',  # booleans are no scores either
        b"<html>not json</html>",
    ],
    ids=["missing-key", "wrong-length", "strings", "booleans", "not-json"],
)
def test_a_malformed_body_makes_the_batch_unscorable_without_retry(serve_fake, token, body):
    fake = serve_fake(lambda hit, n: (200, {"Content-Type": "application/json"}, body))
    with client_for(fake.url) as client:
        scores, metrics = client.score(*samples(2))
    assert scores == [None, None]
    assert metrics["reward/fake/failed_batches"] == 1.0
    assert metrics["reward/fake/retries"] == 0.0
    assert len(fake.hits) == 1


def test_only_the_failed_batch_is_unscorable(serve_fake, token):
    fake = serve_fake(lambda hit, n: json_reply({"scores": []}) if n == 1 else echo_scores(hit, n))
    with client_for(fake.url, batch_size=2) as client:
        scores, metrics = client.score(*samples(5))
    assert scores == [0.0, 1.0, None, None, 4.0]
    assert metrics["reward/fake/failed_batches"] == 1.0
    assert metrics["reward/fake/unscorable"] == 2.0


@pytest.mark.parametrize("status", [400, 401, 403])
def test_client_errors_are_not_retried(serve_fake, token, status):
    fake = serve_fake(lambda hit, n: json_reply({"error": "no"}, status))
    with client_for(fake.url) as client:
        scores, metrics = client.score(*samples(2))
    assert scores == [None, None]
    assert len(fake.hits) == 1
    assert metrics["reward/fake/retries"] == 0.0


def test_a_redirect_is_not_followed(serve_fake, token):
    target = serve_fake(echo_scores)
    fake = serve_fake(lambda hit, n: (302, {"Location": target.url}, b""))
    with client_for(fake.url) as client:
        scores, metrics = client.score(*samples(2))
    assert scores == [None, None]
    assert len(fake.hits) == 1
    assert target.hits == []  # the token never reached the redirect's target
    assert metrics["reward/fake/retries"] == 0.0


def test_proxies_from_the_environment_are_ignored(serve_fake, token, monkeypatch):
    proxy = serve_fake(echo_scores)
    for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(var, proxy.url.removesuffix("/score"))
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    fake = serve_fake(echo_scores)
    with client_for(fake.url) as client:
        scores, _ = client.score(*samples(2))
    assert scores == [0.0, 1.0]
    assert proxy.hits == []


def test_the_warning_names_the_url_and_never_the_token(serve_fake, token, caplog):
    # a server that echoes the request's headers in its error body
    fake = serve_fake(lambda hit, n: json_reply({"headers": hit.headers}, 401))
    with client_for(fake.url) as client, caplog.at_level(logging.WARNING, "reward_service.remote"):
        client.score(*samples(2))
    [record] = caplog.records
    assert fake.url in record.getMessage()
    assert "401" in record.getMessage()
    assert TOKEN not in caplog.text


# --- construction: refuse what cannot work ----------------------------------------------------


@pytest.mark.parametrize(
    ("url", "allowed", "match"),
    [
        ("http://evil.example.com/score", ("rewards.example.com",), "not in allowed_hosts"),
        ("ftp://rewards.example.com/score", (), "scheme 'ftp'"),
        ("file:///etc/passwd", (), "scheme 'file'"),
        ("https:///score", (), "has no host"),
        ("https://user:pw@rewards.example.com/score", (), "carries credentials"),
    ],
)
def test_a_url_that_is_not_allowed_fails_at_construction(token, url, allowed, match):
    with pytest.raises(ValueError, match=match):
        client_for(url, allowed_hosts=allowed)


def test_an_allowlisted_host_is_accepted_case_insensitively(token):
    client_for("https://Rewards.Example.com/score", allowed_hosts=("rewards.example.com",)).close()


@pytest.mark.parametrize(
    "override",
    [
        {"connect_timeout_s": 0.0},
        {"read_timeout_s": -1.0},
        {"read_timeout_s": math.inf},
        {"connect_timeout_s": math.nan},
    ],
)
def test_timeouts_must_be_finite_and_positive(token, override):
    with pytest.raises(ValueError, match=next(iter(override))):
        client_for("http://127.0.0.1:9/score", **override)


def test_a_missing_token_fails_at_construction_naming_the_variable(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ValueError, match=TOKEN_ENV):
        client_for("http://127.0.0.1:9/score")
    monkeypatch.setenv(TOKEN_ENV, "  ")
    with pytest.raises(ValueError, match=TOKEN_ENV):
        client_for("http://127.0.0.1:9/score")


def test_without_token_env_no_authorization_header_is_sent(serve_fake, monkeypatch):
    fake = serve_fake(echo_scores)
    with client_for(fake.url, token_env=None) as client:
        assert client.score(*samples(1))[0] == [0.0]
    assert "Authorization" not in fake.hits[0].headers


def test_lists_of_different_lengths_are_a_caller_error(token):
    with client_for("http://127.0.0.1:9/score") as client, pytest.raises(ValueError):
        client.score(["a"], ["b", "c"], [None])
