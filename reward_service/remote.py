"""The client for a reward server run by another team (protocol: ``reward_service.protocol``).

A plain class, no Ray: the scorer actor that holds it decides where it runs. The contract:

1. The URL is checked once, at construction: http or https, a host on the allowlist, no
   credentials in it. The bearer token comes from an environment variable, never from config.
2. Samples go out in batches of ``batch_size``; each batch is retried on connection errors,
   timeouts, 429 and 5xx with exponential backoff, and never on other 4xx, redirects (3xx is a
   failure, never followed: a redirect could carry the token elsewhere) or a malformed body.
3. A batch that fails for good makes its samples unscorable (``None``); ``score`` never raises for
   a server-side failure. One warning per failed batch names the URL and the reason.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests
import urllib3
from pydantic import ValidationError

from reward_service.protocol import MAX_SAMPLES_PER_REQUEST, ScoreResponse

logger = logging.getLogger(__name__)

_MAX_RESPONSE_BYTES = 16 << 20  # a few bytes per score; more than this is not a score list
_REASON_BODY_CHARS = 200  # how much of an error body a warning quotes


@dataclass(frozen=True)
class RemoteSpec:
    """Where and how to call one remote reward server.

    Attributes:
        name: names the metrics, ``reward/<name>/...``.
        url: the endpoint that takes the POST, e.g. ``https://rewards.example.com/score``.
        allowed_hosts: host names the URL may point at; empty means only the URL's own host.
        token_env: the NAME of the environment variable holding the bearer token; None sends no
            ``Authorization`` header (only for a server run with ``insecure_no_auth``).
        connect_timeout_s: seconds to wait for the TCP/TLS connection.
        read_timeout_s: seconds to wait for the response headers, and for the whole body.
        max_retries: extra attempts per batch after the first, on retryable failures.
        backoff_s: the first retry waits this long (plus jitter), doubling each time.
        batch_size: samples per HTTP request.
    """

    name: str
    url: str
    allowed_hosts: tuple[str, ...] = ()
    token_env: str | None = "RAYLIGN_REWARD_TOKEN"
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 30.0
    max_retries: int = 2
    backoff_s: float = 0.5
    batch_size: int = 64


class _BatchFailed(Exception):
    """A batch that cannot be scored; ``retryable`` says whether another attempt may help."""

    def __init__(self, reason: str, *, retryable: bool):
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


class RemoteRewardClient:
    """Scores samples on a remote reward server over HTTP. One thread at a time (it holds one
    ``requests.Session``); call ``close`` when done, or use it as a context manager.

    Raises:
        ValueError: at construction, for a URL or setting that cannot work, or a missing token.
    """

    def __init__(self, spec: RemoteSpec):
        _validate(spec)
        self.spec = spec
        self._token = _read_token(spec.token_env)
        self._session = requests.Session()
        # Proxies, netrc credentials and CA overrides from the environment must not apply: the
        # call goes to the allowlisted host and nowhere else.
        self._session.trust_env = False
        self.first_failure: str | None = None  # why the run's first failed batch failed
        parts = urlsplit(spec.url)
        if parts.scheme == "http" and self._token and not _is_loopback(parts.hostname):
            logger.warning(
                "reward server %r: %s is plain http; the bearer token crosses the network "
                "unencrypted. Use https.",
                spec.name,
                spec.url,
            )

    def __repr__(self) -> str:
        return f"RemoteRewardClient(name={self.spec.name!r}, url={self.spec.url!r})"

    def __enter__(self) -> RemoteRewardClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the pooled connections."""
        self._session.close()

    def score(
        self, prompts: Sequence[str], responses: Sequence[str], labels: Sequence[str | None]
    ) -> tuple[list[float | None], dict[str, float]]:
        """``(scores, metrics)``: one score per sample, ``None`` where unscorable.

        A server-side failure never raises: the failed batch's samples are ``None``. Metrics:
        ``reward/<name>/unscorable`` (samples scored ``None``, by the server or by a failure),
        ``reward/<name>/failed_batches`` and ``reward/<name>/retries`` (extra attempts made).

        Raises:
            ValueError: the three lists differ in length (a caller bug, not a server failure).
        """
        if not len(prompts) == len(responses) == len(labels):
            raise ValueError(
                f"prompts, responses and labels differ in length: "
                f"{len(prompts)}, {len(responses)}, {len(labels)}"
            )
        scores: list[float | None] = []
        failed_batches = retries = 0
        for start in range(0, len(prompts), self.spec.batch_size):
            stop = start + self.spec.batch_size
            samples = [
                {"prompt": p, "response": r, "label": lab}
                for p, r, lab in zip(
                    prompts[start:stop], responses[start:stop], labels[start:stop], strict=True
                )
            ]
            batch_scores, batch_retries = self._score_batch(samples)
            retries += batch_retries
            if batch_scores is None:
                failed_batches += 1
                batch_scores = [None] * len(samples)
            scores.extend(batch_scores)
        prefix = f"reward/{self.spec.name}"
        metrics = {
            f"{prefix}/unscorable": float(sum(s is None for s in scores)),
            f"{prefix}/failed_batches": float(failed_batches),
            f"{prefix}/retries": float(retries),
        }
        return scores, metrics

    def _score_batch(self, samples: list[dict]) -> tuple[list[float | None] | None, int]:
        """``(scores or None if the batch failed for good, retries made)``."""
        attempts = self.spec.max_retries + 1
        for attempt in range(attempts):
            try:
                return self._post(samples), attempt
            except _BatchFailed as failure:
                if failure.retryable and attempt + 1 < attempts:
                    delay = self.spec.backoff_s * 2**attempt
                    time.sleep(delay + random.uniform(0.0, 0.1 * delay))
                    continue
                reason = self._redact(failure.reason)
                logger.warning(
                    "reward server %r at %s: batch of %d samples unscorable after %d attempt(s): "
                    "%s",
                    self.spec.name,
                    self.spec.url,
                    len(samples),
                    attempt + 1,
                    reason,
                )
                if self.first_failure is None:
                    self.first_failure = f"{reason} (after {attempt + 1} attempt(s))"
                return None, attempt
        raise AssertionError("unreachable: the last attempt returns")

    def _post(self, samples: list[dict]) -> list[float | None]:
        """One attempt. Raises ``_BatchFailed`` for every way the attempt can fail."""
        # identity: score lists are small, and an undecoded body is one less way to fail
        headers = {"Accept-Encoding": "identity"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        try:
            with self._session.post(
                self.spec.url,
                json={"samples": samples},
                headers=headers,
                timeout=(self.spec.connect_timeout_s, self.spec.read_timeout_s),
                allow_redirects=False,
                stream=True,  # read the body ourselves, under a deadline and a size cap
            ) as response:
                body = self._read_body(response)
                status = response.status_code
                location = response.headers.get("Location", "")
        except (requests.ConnectionError, requests.Timeout) as e:
            raise _BatchFailed(f"{type(e).__name__}: {e}", retryable=True) from e
        except requests.RequestException as e:
            raise _BatchFailed(f"{type(e).__name__}: {e}", retryable=False) from e

        if 300 <= status < 400:
            raise _BatchFailed(
                f"HTTP {status} redirect to {location!r}, not followed", retryable=False
            )
        if not 200 <= status < 300:
            snippet = body[:_REASON_BODY_CHARS].decode("utf-8", "replace")
            raise _BatchFailed(
                f"HTTP {status}: {snippet!r}", retryable=status == 429 or status >= 500
            )
        try:
            parsed = ScoreResponse.model_validate_json(body)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "body"
            raise _BatchFailed(
                f"malformed response body ({e.error_count()} errors; first at {where}: "
                f"{first['msg']})",
                retryable=False,
            ) from e
        if len(parsed.scores) != len(samples):
            raise _BatchFailed(
                f"malformed response body: {len(parsed.scores)} scores for {len(samples)} samples",
                retryable=False,
            )
        # NaN/inf is no score to train on: unscorable, like null
        return [s if s is not None and math.isfinite(s) else None for s in parsed.scores]

    def _read_body(self, response: requests.Response) -> bytes:
        """The body, read within ``read_timeout_s`` in total (a server that trickles bytes cannot
        hold the run) and at most ``_MAX_RESPONSE_BYTES``. Raises ``_BatchFailed``."""
        deadline = time.monotonic() + self.spec.read_timeout_s
        chunks, size = [], 0
        while True:
            try:
                chunk = response.raw.read1(64 << 10)  # what has arrived, up to 64 KiB
            except urllib3.exceptions.HTTPError as e:  # read timeout, connection cut mid-body
                raise _BatchFailed(
                    f"reading the body: {type(e).__name__}: {e}", retryable=True
                ) from e
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > _MAX_RESPONSE_BYTES:
                raise _BatchFailed(
                    f"response body over {_MAX_RESPONSE_BYTES} bytes", retryable=False
                )
            if time.monotonic() > deadline:
                raise _BatchFailed(
                    f"response body not complete within {self.spec.read_timeout_s} s",
                    retryable=True,
                )
            chunks.append(chunk)

    def _redact(self, text: str) -> str:
        # a server may echo the request's headers in an error body; the token never reaches a log
        return text.replace(self._token, "<token>") if self._token else text


def _validate(spec: RemoteSpec) -> None:
    """Raises ValueError naming the setting and the fix."""
    if not spec.name:
        raise ValueError("RemoteSpec.name is empty; it names the metrics reward/<name>/...")
    parts = urlsplit(spec.url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(
            f"reward server url {spec.url!r} has scheme {parts.scheme!r}; use http:// or https://"
        )
    if not parts.hostname:
        raise ValueError(f"reward server url {spec.url!r} has no host; write scheme://host/path")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            f"reward server url {spec.url!r} carries credentials; remove them and put the token "
            "in the environment variable named by token_env"
        )
    allowed = {h.lower() for h in spec.allowed_hosts}
    if allowed and parts.hostname.lower() not in allowed:
        raise ValueError(
            f"reward server url {spec.url!r}: host {parts.hostname!r} is not in allowed_hosts "
            f"{sorted(allowed)}; fix the url or add the host to allowed_hosts"
        )
    for field in ("connect_timeout_s", "read_timeout_s"):
        value = getattr(spec, field)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(
                f"RemoteSpec.{field} = {value} for {spec.url!r}; use a finite number of seconds > 0"
            )
    if not (math.isfinite(spec.backoff_s) and spec.backoff_s >= 0):
        raise ValueError(f"RemoteSpec.backoff_s = {spec.backoff_s}; use a finite number >= 0")
    if spec.max_retries < 0:
        raise ValueError(f"RemoteSpec.max_retries = {spec.max_retries}; use 0 or more")
    if not 1 <= spec.batch_size <= MAX_SAMPLES_PER_REQUEST:
        raise ValueError(
            f"RemoteSpec.batch_size = {spec.batch_size}; use 1..{MAX_SAMPLES_PER_REQUEST} "
            "(the most samples a server takes per request)"
        )


def _read_token(token_env: str | None) -> str | None:
    if token_env is None:
        return None
    token = os.environ.get(token_env, "").strip()
    if not token:
        raise ValueError(
            f"environment variable {token_env} (RemoteSpec.token_env) is missing or empty; set it "
            "to the reward server's bearer token, or set token_env=None for a server without auth"
        )
    return token


def _is_loopback(host: str | None) -> bool:
    return host in ("localhost", "127.0.0.1", "::1")
