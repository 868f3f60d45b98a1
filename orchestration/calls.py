"""Waiting on remote calls: every wait is bounded (``cluster.call_timeout_s``) and a timeout
names the stage that hung (``train: no answer within cluster.call_timeout_s=1800``), never a
bare ``GetTimeoutError``."""

from __future__ import annotations

import ray


class StageTimeout(TimeoutError):
    """A remote call of a named stage did not answer in time."""


def wait(refs, stage: str, timeout: float):
    """``ray.get(refs)`` within ``timeout`` seconds; a hang becomes :class:`StageTimeout`."""
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise StageTimeout(
            f"{stage}: no answer within cluster.call_timeout_s={timeout:g}"
        ) from None


def ready(ref: ray.ObjectRef, stage: str, timeout: float) -> ray.ObjectRef:
    """Wait until ``ref`` is computed without pulling it here (a stage timer needs it done)."""
    done, _ = ray.wait([ref], timeout=timeout, fetch_local=False)
    if not done:
        raise StageTimeout(f"{stage}: no answer within cluster.call_timeout_s={timeout:g}")
    return ref


def first_ready(refs: list, stage: str, timeout: float) -> ray.ObjectRef:
    """The first of ``refs`` to be computed, within ``timeout`` seconds."""
    done, _ = ray.wait(refs, timeout=timeout, fetch_local=False)
    if not done:
        raise StageTimeout(f"{stage}: no answer within cluster.call_timeout_s={timeout:g}")
    return done[0]
