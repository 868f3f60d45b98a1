"""Rule reward functions run in a child process, each call bounded in time.

A reward function is user code: it can raise, return something that is not a number, hang, or
take its process down. :class:`ContainedFunction` keeps a child process (``python -m
reward_service.contained``) that resolves the function once and then answers calls over a
pipe, one result per sample as soon as it is computed. The parent waits for each result at most
``timeout_s``: a call that takes longer gets its child killed (``SIGKILL`` reaches code stuck in C
too), its sample marked as timed out, and a fresh child takes the rest of the batch. A child that
dies (a crash, ``os._exit``) is replaced the same way. After :data:`MAX_LOST_IN_A_ROW` calls in
a row lost so (timed out or died) the function's remaining samples in the batch are not tried,
so a function that hangs on everything costs a few timeouts per batch, not one per sample.

What the function returns is judged in the child: ``None`` is unscorable by the function's own
decision; a real number (``int``, ``float``, ``bool``, numpy scalars) is the score; anything else
(a string, a list, NaN, infinity) is an error, like an exception. A child is a limit on time and
damage to the scorer's process, not a security boundary: it runs as the same user.

:func:`apply` (one call on one sample, judged, an exception caught as that sample's error) and
:class:`Problem` (a function's failures counted over a run) are the one way every caller applies
reward functions: the child here, and the reward service (``reward_service.server``), which
calls them in its own process.
"""

from __future__ import annotations

import math
import numbers
import os
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Literal

MAX_LOST_IN_A_ROW = 3
START_TIMEOUT_S = 120.0  # importing the function's module, not part of any call's limit
EXIT_GRACE_S = 5.0  # a child that hung up has this long to exit before it is killed


@dataclass(frozen=True)
class Outcome:
    """One call's result: ``value`` (None = unscorable) and, when the call failed, what went
    wrong (``error``: one line naming the exception and where it was raised, the returned
    value, or the timeout)."""

    value: float | None
    error: str | None = None


def judge(value: Any) -> Outcome:
    """A function's return value as an outcome: None, a finite real number, or an error."""
    if value is None:
        return Outcome(None)
    if isinstance(value, numbers.Real) and not isinstance(value, complex):
        number = float(value)
        if math.isfinite(number):
            return Outcome(number)
        return Outcome(None, f"returned {number!r}, not a finite number")
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return Outcome(None, f"returned {shown} ({type(value).__name__}), not a number")


def describe_exception(error: BaseException) -> str:
    """``ValueError: bad label (rewards.py:12 in my_reward)``: the exception and the innermost
    frame it was raised in."""
    frames = traceback.extract_tb(error.__traceback__)
    where = ""
    if frames:
        last = frames[-1]
        where = f" ({os.path.basename(last.filename)}:{last.lineno} in {last.name})"
    message = str(error)
    message = message if len(message) <= 200 else message[:197] + "..."
    return f"{type(error).__name__}: {message}{where}"


def apply(
    fn: Callable[[str, str, str | None], Any], prompt: str, response: str, label: str | None
) -> Outcome:
    """One call of a reward function on one sample, judged (:func:`judge`); an exception is
    this sample's error (:func:`describe_exception`), never the batch's."""
    try:
        return judge(fn(prompt, response, label))
    except Exception as e:  # noqa: BLE001 - user code: any failure is this sample's
        return Outcome(None, describe_exception(e))


@dataclass
class Problem:
    """What went wrong with one reward function over the run: its first error (None while no
    call has failed), how many samples failed, and out of how many it was asked to score."""

    first_error: str | None = None
    errors: int = 0
    samples: int = 0

    def record(self, outcomes: Sequence[Outcome]) -> int:
        """Count one batch's outcomes; returns how many of them are errors."""
        errors = [o.error for o in outcomes if o.error is not None]
        self.samples += len(outcomes)
        self.errors += len(errors)
        if errors and self.first_error is None:
            self.first_error = errors[0]
        return len(errors)

    def describe(self, name: str) -> str:
        return (
            f"reward function {name!r} failed on {self.errors} of {self.samples} samples so far; "
            f"first error: {self.first_error}"
        )


class ContainedFunction:
    """A reward function ``(prompt, response, label) -> float | None`` in its own process.

    Args:
        name, params: as for ``reward_service.rules.resolve`` (resolved in the child; a bad name
            or param fails here, in the constructor, with resolve's message).
        timeout_s: the longest one call may take.
    """

    def __init__(self, name: str, params: Mapping[str, Any] | None, timeout_s: float):
        self.name, self.params, self.timeout_s = name, dict(params or {}), timeout_s
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._start()

    def __call__(
        self, prompts: Sequence[str], responses: Sequence[str], labels: Sequence[str | None]
    ) -> list[Outcome]:
        """One outcome per sample, in order."""
        samples = list(zip(prompts, responses, labels, strict=True))
        outcomes: list[Outcome] = []
        lost = 0  # calls in a row that timed out or took the child down
        while len(outcomes) < len(samples):
            if self._proc is None:
                self._start()
            self._conn.send(("score", samples[len(outcomes) :]))
            while len(outcomes) < len(samples):
                outcome = self._next()
                if not isinstance(outcome, Outcome):  # timed out or hung up: the child is gone
                    break
                outcomes.append(outcome)
                lost = 0
            else:
                break
            died = self._stop(exiting=outcome == "hung up")
            lost += 1
            if died is None:
                limit = f"reward.function_timeout_s={self.timeout_s:g}"
                outcomes.append(Outcome(None, f"no answer within {limit}"))
            else:
                outcomes.append(Outcome(None, f"its process died (exit code {died})"))
            if lost >= MAX_LOST_IN_A_ROW and len(outcomes) < len(samples):
                skipped = Outcome(
                    None,
                    f"not tried: the {lost} calls before it timed out or took the function's "
                    "process down",
                )
                outcomes.extend([skipped] * (len(samples) - len(outcomes)))
        return outcomes

    def _next(self) -> Outcome | Literal["timed out", "hung up"]:
        """The next sample's outcome, or why there is none: the call timed out, or the child
        closed its end of the pipe (it died)."""
        if not self._conn.poll(self.timeout_s):
            return "timed out"
        try:
            value, error = self._conn.recv()
        except (EOFError, OSError):
            return "hung up"
        return Outcome(value, error)

    def _start(self) -> None:
        parent, child = socket.socketpair()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "reward_service.contained", str(child.fileno())],
            pass_fds=(child.fileno(),),
            env=env,
            stdin=subprocess.DEVNULL,
        )
        child.close()
        self._conn = Connection(parent.detach())
        self._conn.send(("resolve", self.name, self.params))
        if not self._conn.poll(START_TIMEOUT_S):
            self._stop()
            raise TimeoutError(
                f"reward function {self.name!r}: its process did not start within "
                f"{START_TIMEOUT_S:g} s"
            )
        status, message = self._conn.recv()
        if status != "ready":
            self._stop()
            raise ValueError(message)

    def _stop(self, exiting: bool = False) -> int | None:
        """Kill the child if it still runs; returns its exit code if it had exited by itself
        (None when it was killed here). ``exiting``: it hung up, so it is on its way out."""
        proc, self._proc = self._proc, None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if proc is None:
            return None
        code = proc.poll()
        if code is None and exiting:
            # its pipe closes a moment before its exit can be seen: wait for the exit code, or
            # a crash would be reported as a timeout
            try:
                code = proc.wait(timeout=EXIT_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        if code is None:
            proc.kill()
            proc.wait(timeout=30)
        return code

    def close(self) -> None:
        self._stop()

    def __del__(self):
        try:
            self._stop()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to report to
            pass


def _serve(conn: Connection) -> None:
    """The child: resolve the function, then score batches until the parent goes away."""
    from reward_service.rules import resolve

    fn = None
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] == "resolve":
            try:
                fn = resolve(message[1], message[2])
            except Exception as e:  # noqa: BLE001 - reported to the parent as the error
                conn.send(("error", str(e)))
                return
            conn.send(("ready", ""))
            continue
        for prompt, response, label in message[1]:
            outcome = apply(fn, prompt, response, label)
            conn.send((outcome.value, outcome.error))


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])))
