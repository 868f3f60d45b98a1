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


def wait_each(jobs: dict[str, list], timeout: float) -> dict[str, tuple[list, float]]:
    """Wait for jobs running at once (``name -> refs``), all within ``timeout`` seconds; each
    job's results and the seconds until its last ref was computed, from now."""
    import time

    start, owner = time.perf_counter(), {r: name for name, refs in jobs.items() for r in refs}
    left = {name: len(refs) for name, refs in jobs.items()}
    seconds: dict[str, float] = {}
    pending = list(owner)
    while pending:
        remaining = timeout - (time.perf_counter() - start)
        done, pending = ray.wait(pending, timeout=max(remaining, 0), fetch_local=False)
        if not done:
            names = sorted({owner[r] for r in pending})
            raise StageTimeout(
                f"{', '.join(names)}: no answer within cluster.call_timeout_s={timeout:g}"
            )
        for ref in done:
            left[owner[ref]] -= 1
            if not left[owner[ref]]:
                seconds[owner[ref]] = time.perf_counter() - start
    return {name: (wait(refs, name, timeout), seconds[name]) for name, refs in jobs.items()}
