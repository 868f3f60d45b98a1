"""python -m reward_service.server --functions exact_integer --port 8100

The HTTP reward service (protocol: ``reward_service.protocol``) as a Ray Serve application. The
command above starts Ray (or joins the cluster at ``--address``/``RAY_ADDRESS``/the one running
on this machine), serves ``http://127.0.0.1:8100/score`` and blocks until Ctrl-C, which takes
the application down again. With the Serve CLI instead (it serves on Serve's default
127.0.0.1:8000; other host/port only through a Serve config file's ``http_options``)::

    serve run reward_service.server:build_app --route-prefix /score functions=exact_integer

Choices:

1. Auth: every request needs ``Authorization: Bearer <token>``, compared in constant time with
   the token each replica reads at startup from its environment (``RAYLIGN_REWARD_TOKEN`` by
   default; replicas of a cluster started by this command inherit this shell's environment).
   Without a token a replica refuses to start, unless run with ``insecure_no_auth`` (then it
   logs a loud warning).
2. What it serves: reward functions by name (``reward_service.rules.resolve``) with weights and
   optional params, plus optionally a reward model; the score is the weighted sum, null when any
   term is null, raises, or is not a finite number (the functions are applied as the run's rule
   scorer applies them: ``reward_service.contained.apply``, but in the replica's process).
3. Bad requests are refused with a message: 401 (auth), 405 (not POST), 413 (body over 64 MiB),
   400 (not the protocol, or over ``MAX_SAMPLES_PER_REQUEST`` samples).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any

import requests
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import JSONResponse

from reward_service.contained import Problem, apply
from reward_service.protocol import Sample, ScoreRequest
from reward_service.rules import RewardFunction, resolve

logger = logging.getLogger(__name__)

DEFAULT_TOKEN_ENV = "RAYLIGN_REWARD_TOKEN"
MAX_BODY_BYTES = 64 << 20
"""Request bodies above this are refused (413) before they are parsed."""


class FunctionSpec(BaseModel):
    """One reward function in the weighted sum."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    """A built-in of ``reward_service.rules`` or an import path ``package.module:function``."""
    weight: float = Field(default=1.0, allow_inf_nan=False)
    params: dict[str, Any] = Field(default_factory=dict)
    """Passed to ``resolve(name, params)``; empty: ``resolve(name)``."""


class ServerArgs(BaseModel):
    """The application's arguments, as the app builder takes them (strings from the Serve CLI
    are parsed: ``functions=a,b`` or ``functions='[{"name": "a", "weight": 0.5}]'``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    functions: list[FunctionSpec] = Field(default_factory=list)
    token_env: str = DEFAULT_TOKEN_ENV
    """NAME of the environment variable holding the bearer token, read by each replica."""
    insecure_no_auth: bool = False
    """Serve without auth. Only for a server nobody else can reach."""
    model_path: str | None = None
    """A reward model, scored with ``reward_service.reward_model.RewardModel``; None: none."""
    model_weight: float = Field(default=1.0, allow_inf_nan=False)

    @field_validator("functions", mode="before")
    @classmethod
    def _parse_functions(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ValueError(f"functions is not valid JSON: {e}") from e
            else:
                value = [name.strip() for name in text.split(",") if name.strip()]
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _something_to_serve(self) -> ServerArgs:
        if not self.functions and self.model_path is None:
            raise ValueError(
                "nothing to serve: give functions (e.g. exact_integer), a model_path, or both"
            )
        return self


def resolve_functions(functions: list[FunctionSpec]) -> list[tuple[FunctionSpec, RewardFunction]]:
    """Each spec with its function. Raises ValueError for a name that does not resolve."""
    return [(f, resolve(f.name, f.params) if f.params else resolve(f.name)) for f in functions]


class SampleScorer:
    """Scores samples: the weighted sum of the reward functions, plus the reward model's score
    times ``model_weight`` when there is a model. Plain class; the deployment holds one and
    calls it from several threads at once (the functions are pure; the model runs one call at a
    time)."""

    def __init__(self, args: ServerArgs):
        self.functions = resolve_functions(args.functions)
        self.problems = [Problem() for _ in self.functions]  # each function's failures
        self._problems_lock = threading.Lock()  # score runs in several threads at once
        self.model_weight = args.model_weight
        self.model = None
        self._model_lock = threading.Lock()
        if args.model_path is not None:
            from reward_service.reward_model import RewardModel  # heavy: only when asked for

            self.model = RewardModel(args.model_path)

    def score(self, samples: list[Sample]) -> list[float | None]:
        """One score per sample; None where any term is None, raised or is not a finite number
        (``reward_service.contained.apply``). A function that fails is logged once per call,
        with its counts over the replica's life; a model that raises fails the call."""
        totals: list[float | None] = [0.0] * len(samples)
        for (spec, fn), problem in zip(self.functions, self.problems, strict=True):
            asked = [i for i, total in enumerate(totals) if total is not None]
            outcomes = [
                apply(fn, samples[i].prompt, samples[i].response, samples[i].label) for i in asked
            ]
            for i, outcome in zip(asked, outcomes, strict=True):
                totals[i] = _add(totals[i], spec.weight, outcome.value)
            with self._problems_lock:
                failed = problem.record(outcomes)
                message = problem.describe(spec.name)
            if failed:
                logger.warning("%s; its failed samples are unscorable", message)
        if self.model is not None:
            with self._model_lock:
                values = self.model.score_texts(
                    [s.prompt for s in samples], [s.response for s in samples]
                )
            if len(values) != len(samples):
                raise RuntimeError(
                    f"the reward model gave {len(values)} scores for {len(samples)} samples"
                )
            totals = [_add(t, self.model_weight, v) for t, v in zip(totals, values, strict=True)]
        return totals


def _add(total: float | None, weight: float, value: float | None) -> float | None:
    if total is None or value is None:
        return None
    value = float(value)
    if not math.isfinite(value):
        return None  # a NaN/inf score is as unscorable as None, not a number to train on
    return total + weight * value


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


@serve.deployment
class RewardServer:
    """The Serve deployment: POST ``{"samples": [...]}`` -> ``{"scores": [...]}``.

    Raises:
        ValueError: at startup, when the token variable is missing or empty (and
            ``insecure_no_auth`` is off), or a reward function does not resolve.
    """

    def __init__(self, args: ServerArgs):
        self._token: bytes | None = None
        if args.insecure_no_auth:
            logger.warning(
                "REWARD SERVER WITHOUT AUTH (insecure_no_auth): anyone who can reach it can use it"
            )
        else:
            token = os.environ.get(args.token_env, "").strip()
            if not token:
                raise ValueError(
                    f"environment variable {args.token_env} is missing or empty in the replica; "
                    "set it (in the environment Ray's workers start in) to the bearer token "
                    "clients send, or run with insecure_no_auth"
                )
            self._token = token.encode()
        self.scorer = SampleScorer(args)

    def _authorized(self, request: Request) -> bool:
        if self._token is None:
            return True
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            credentials.strip().encode(), self._token
        )

    async def __call__(self, request: Request) -> JSONResponse:
        if request.method != "POST":
            return _error(405, 'POST {"samples": [...]} to score', Allow="POST")
        if not self._authorized(request):
            return _error(401, "missing or wrong bearer token", **{"WWW-Authenticate": "Bearer"})
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return _error(413, f"body over {MAX_BODY_BYTES} bytes; send smaller batches")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return _error(413, f"body over {MAX_BODY_BYTES} bytes; send smaller batches")
        try:
            parsed = ScoreRequest.model_validate_json(bytes(body))
        except ValidationError as e:
            details = "; ".join(
                f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}"
                for err in e.errors()[:5]
            )
            return _error(400, f"not a score request ({e.error_count()} errors): {details}")
        # off the event loop: a slow function (code_tests runs code) must not stall the replica,
        # whose health probe fails when its loop is blocked
        scores = await asyncio.to_thread(self.scorer.score, parsed.samples)
        return JSONResponse({"scores": scores})


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application, for ``serve run reward_service.server:build_app functions=...``.

    Keys: ``functions`` (names comma-separated, or a JSON list of ``{"name", "weight",
    "params"}``), ``token_env``, ``insecure_no_auth``, ``model_path``, ``model_weight``; see
    ``ServerArgs``. The functions are resolved here too, so a bad name fails before deploying.

    Raises:
        ValueError: bad or unknown arguments, or a function that does not resolve.
    """
    config = ServerArgs.model_validate(args)
    resolve_functions(config.functions)
    return RewardServer.bind(config)


def deploy_failure(app_name: str) -> str:
    """What Serve's status says about each deployment of the application (their errors, when a
    replica failed to start: ``serve.run`` itself raises only "failed to update")."""
    app = serve.status().applications.get(app_name)
    if app is None:
        return f"no application {app_name!r} on this cluster"
    return "\n".join(f"{name}: {d.status}: {d.message}" for name, d in app.deployments.items())


def _wait_until_served(url: str, timeout_s: float = 30.0) -> None:
    """Raises RuntimeError unless our app answers at ``url`` (a GET gets its 405)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    session = requests.Session()
    session.trust_env = False  # a proxy from the environment must not answer for us
    while time.monotonic() < deadline:
        try:
            response = session.get(url, timeout=2.0, allow_redirects=False)
            if response.status_code == 405 and response.headers.get("allow") == "POST":
                return
            last = f"HTTP {response.status_code}"
        except requests.ConnectionError as e:
            last = f"{type(e).__name__}"
        time.sleep(0.5)
    raise RuntimeError(
        f"the reward app is deployed but does not answer at {url} ({last}). If Serve was already "
        "running on this cluster with other HTTP options, it kept them: use its host and port, "
        "or `serve shutdown` first"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m reward_service.server",
        description="Serve reward functions (and a reward model) over HTTP with Ray Serve.",
    )
    parser.add_argument(
        "--functions",
        default="",
        help="reward functions: names comma-separated, or a JSON list of {name, weight, params}",
    )
    parser.add_argument("--port", type=int, default=8100, help="HTTP port")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to listen on; 0.0.0.0 exposes it to the network",
    )
    parser.add_argument("--route", default="/score", help="the URL path that takes the POST")
    parser.add_argument(
        "--token-env",
        default=DEFAULT_TOKEN_ENV,
        help="NAME of the environment variable holding the bearer token",
    )
    parser.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve without auth (only where nobody else can reach it)",
    )
    parser.add_argument(
        "--model-path", default=None, help="a reward model to add to the functions' sum"
    )
    parser.add_argument("--model-weight", type=float, default=1.0, help="the reward model's weight")
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (default: RAY_ADDRESS, the one running here, or a new local one)",
    )
    parser.add_argument("--name", default="raylign-reward", help="the Serve application's name")
    ns = parser.parse_args(argv)
    if not 1 <= ns.port <= 65535:
        parser.error(f"--port {ns.port}: use 1..65535")
    if not ns.route.startswith("/"):
        parser.error(f"--route {ns.route!r}: a path starting with '/', e.g. /score")
    args: dict[str, Any] = {
        "functions": ns.functions,
        "token_env": ns.token_env,
        "insecure_no_auth": ns.insecure_no_auth,
        "model_path": ns.model_path,
        "model_weight": ns.model_weight,
    }
    app = build_app(args)  # fails on bad arguments before Ray starts
    if ns.host in ("0.0.0.0", "::"):
        logger.warning(
            "listening on all interfaces (%s): anyone on the network can reach it", ns.host
        )

    import ray

    ray.init(address=ns.address)
    serve.start(http_options={"host": ns.host, "port": ns.port})
    # named: an unnamed serve.run would replace every other application on the cluster
    try:
        serve.run(app, name=ns.name, route_prefix=ns.route)
    except RuntimeError as e:  # Serve says only "failed"; the replica's error is in the status
        raise RuntimeError(f"{e}\n{deploy_failure(ns.name)}") from e
    host = f"[{ns.host}]" if ":" in ns.host else ns.host
    url = f"http://{host}:{ns.port}{ns.route}"
    _wait_until_served(url)
    auth = "NO AUTH" if ns.insecure_no_auth else f"bearer token from ${ns.token_env}"
    print(f"reward service at {url} ({auth}); Ctrl-C stops it", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a service manager's stop, too
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        # a second Ctrl-C (a terminal sends one to every process of the group) must not cut the
        # clean-up short: on a cluster we joined, the application would outlive this command
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        serve.delete(ns.name)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
