"""The reward service as a real Ray Serve application on a local Ray, called over HTTP by the real
client: scores, auth, bad requests, a replica that refuses to start without its token, and a
real run it scores, through an outage.

One Ray and one Serve for the module (starting them is most of the time). ``private_env`` is
function-scoped, so the module fixture gives itself the same private HOME and short TMPDIR.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest
import requests
from ray import serve

from reward_service.remote import RemoteRewardClient, RemoteSpec
from reward_service.server import MAX_BODY_BYTES, build_app, deploy_failure
from tests.helpers import free_port

pytestmark = pytest.mark.slow

TOKEN_ENV = "RAYLIGN_TEST_SERVER_TOKEN"
TOKEN = "server-test-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    """The app serving exact_integer at ``http://127.0.0.1:<port>``; yields that base URL."""
    import ray

    tmp = tempfile.mkdtemp(prefix="rl", dir="/tmp")  # short: Ray's socket paths fit in 107 bytes
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        mp.setenv("TMPDIR", tmp)
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.setenv(TOKEN_ENV, TOKEN)  # before ray.init: the replicas inherit this environment
        port = free_port()
        # (4 logical CPUs: the run at the end of the module places its actors beside Serve's)
        ray.init(num_cpus=4, include_dashboard=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            app = build_app({"functions": "exact_integer", "token_env": TOKEN_ENV})
            serve.run(app, name="reward", route_prefix="/score")
            yield f"http://127.0.0.1:{port}"
        finally:
            serve.shutdown()
            ray.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)


def body(*samples: tuple[str, str, str | None]) -> dict:
    return {"samples": [{"prompt": p, "response": r, "label": lab} for p, r, lab in samples]}


def test_the_real_client_gets_exact_integer_scores(server, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    spec = RemoteSpec(name="served", url=f"{server}/score", token_env=TOKEN_ENV, batch_size=2)
    with RemoteRewardClient(spec) as client:
        scores, metrics = client.score(
            ["3+4=", "3+4=", "3+4=", "3+4=", "1+1="],
            ["7", "8", "x", " 7 ", "2"],
            ["7", "7", "7", "7", None],
        )
    # right answer 1.0, wrong integer 0.1, not an integer 0.0, no label: unscorable
    assert scores == [1.0, 0.1, 0.0, 1.0, None]
    assert metrics == {
        "reward/served/unscorable": 1.0,
        "reward/served/failed_batches": 0.0,
        "reward/served/retries": 0.0,
    }


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": TOKEN}],
    ids=["no-token", "wrong-token", "no-bearer-scheme"],
)
def test_a_request_without_the_right_token_gets_401(server, headers):
    response = requests.post(f"{server}/score", json=body(("1+1=", "2", "2")), headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert "scores" not in response.json()


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b'{"samples": [{"prompt": "1+1=", "response": 2, "label": "2"}]}',  # a number, not text
        b'{"samples": [{"prompt": "1+1=", "label": "2"}]}',  # no response
        b'{"sample": []}',  # misspelt key
        b'{"samples": [' + b",".join([b'{"prompt": "", "response": ""}'] * 4097) + b"]}",
    ],
    ids=["not-json", "wrong-type", "missing-field", "unknown-key", "too-many-samples"],
)
def test_a_malformed_request_gets_400_with_a_message(server, payload):
    response = requests.post(
        f"{server}/score",
        data=payload,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"].startswith("not a score request")


def test_a_body_declared_over_the_limit_gets_413_before_it_is_sent(server):
    host, port = server.removeprefix("http://").split(":")
    head = (
        f"POST /score HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {MAX_BODY_BYTES + 1}\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(head.encode())
        status_line = conn.recv(4096).split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 413 ")


def test_get_is_405(server):
    assert requests.get(f"{server}/score").status_code == 405


def test_a_replica_without_its_token_refuses_to_start(server):
    app = build_app({"functions": "exact_integer", "token_env": "RAYLIGN_TEST_UNSET_TOKEN"})
    try:
        with pytest.raises(RuntimeError, match="no-token failed"):
            serve.run(app, name="no-token", route_prefix="/no-token")
        # the replica's own error, as the command line reports it
        assert "RAYLIGN_TEST_UNSET_TOKEN is missing or empty" in deploy_failure("no-token")
    finally:
        serve.delete("no-token")


def test_insecure_no_auth_serves_without_a_token(server):
    app = build_app({"functions": "exact_integer", "insecure_no_auth": "true"})
    serve.run(app, name="open", route_prefix="/open")
    try:
        response = requests.post(f"{server}/open", json=body(("3+4=", "7", "7")))
        assert response.status_code == 200
        assert response.json() == {"scores": [1.0]}
    finally:
        serve.delete("open")


def test_the_command_line_help_exits_0():
    done = subprocess.run(
        [sys.executable, "-m", "reward_service.server", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "--functions" in done.stdout


@serve.deployment
class Hanging:
    """A reward endpoint that never answers in time."""

    async def __call__(self, request):
        import asyncio

        await asyncio.sleep(30)
        return {"scores": []}


@serve.deployment
class Malformed:
    """A reward endpoint that answers, but not with the protocol's shape."""

    async def __call__(self, request):
        n = len((await request.json())["samples"])
        return {"scores": ["high"] * n}


def test_a_hanging_serve_endpoint_times_out_and_its_samples_are_unscorable(server, monkeypatch):
    import time

    serve.run(Hanging.bind(), name="hanging", route_prefix="/hanging")
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    spec = RemoteSpec(
        name="slow",
        url=f"{server}/hanging",
        token_env=TOKEN_ENV,
        read_timeout_s=1.0,
        max_retries=1,
        backoff_s=0.1,
    )
    start = time.perf_counter()
    with RemoteRewardClient(spec) as client:
        scores, metrics = client.score(["1+1="] * 3, ["2"] * 3, ["2"] * 3)
    seconds = time.perf_counter() - start
    assert scores == [None, None, None]
    assert metrics["reward/slow/failed_batches"] == 1
    assert metrics["reward/slow/retries"] == 1
    assert 2.0 <= seconds < 6.0  # two attempts of 1 s each, not the endpoint's 30 s
    serve.delete("hanging")


def test_a_malformed_serve_answer_gives_unscorable_samples(server, monkeypatch):
    serve.run(Malformed.bind(), name="malformed", route_prefix="/malformed")
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    spec = RemoteSpec(name="odd", url=f"{server}/malformed", token_env=TOKEN_ENV, max_retries=2)
    with RemoteRewardClient(spec) as client:
        scores, metrics = client.score(["1+1="] * 2, ["2"] * 2, ["2"] * 2)
    assert scores == [None, None]
    assert metrics["reward/odd/failed_batches"] == 1
    assert metrics["reward/odd/retries"] == 0  # a malformed body is not retried
    serve.delete("malformed")


def test_a_run_scored_by_the_serve_reward_service_survives_its_outage(server, tmp_path):
    """A real run (the demo's actors on this module's Ray) scored by the service: the served
    scores equal the same function's computed locally; with the service gone mid-run every
    sample is unscorable and the run goes on; back, it scores again. (Last in the module: it
    takes the app down and puts it back.)"""
    from orchestration.config import load_config
    from orchestration.loop import start_loop
    from orchestration.placement import start_actors
    from orchestration.prepare import prepare
    from orchestration.sampler import PromptSampler

    cfg = load_config(
        "demo",
        [
            "reward.functions=[]",
            f"reward.remote=[{{name: remote, url: '{server}/score', token_env: {TOKEN_ENV}, "
            "read_timeout_s: 5, max_retries: 1, backoff_s: 0.1}]",
            "reward.monitors=[{name: exact_integer}]",  # the same function, computed locally
            "reward.no_eos_penalty=null",
            "iterations=3",
            f"logging.root={tmp_path}",
        ],
    )
    prep = prepare(cfg, "demo")
    actors = start_actors(cfg, prep.model_path, prep.pad_token_id)
    try:
        trainer = start_loop(cfg, actors, PromptSampler(prep.prompts, 0), prep)
        samples = cfg.data.prompts_per_iteration * cfg.generator.samples_per_prompt

        served = trainer.iteration()
        assert served["reward/remote/unscorable"] == 0
        # The service scored the very responses the local monitor scored, with the same function.
        assert served["reward/remote/mean"] == pytest.approx(served["reward/exact_integer/mean"])
        assert served["reward/score_mean"] == pytest.approx(served["reward/exact_integer/mean"])

        serve.delete("reward")  # the reward service goes away mid-run
        outage = trainer.iteration()
        assert outage["reward/remote/unscorable"] == samples
        assert outage["reward/unscorable"] == samples
        assert outage["reward/remote/failed_batches"] >= 1
        assert outage["rollout/weight_version"] == 1  # ... and the run went on

        app = build_app({"functions": "exact_integer", "token_env": TOKEN_ENV})
        serve.run(app, name="reward", route_prefix="/score")
        back = trainer.iteration()
        assert back["reward/remote/unscorable"] == 0
        assert back["reward/remote/mean"] == pytest.approx(back["reward/exact_integer/mean"])
        assert trainer.version == 3
    finally:
        actors.release()
