"""An environment in its own process: ``episodes.isolation: actor``.

By default an environment runs in the generator's process, each call in a thread of its own
(``actors.episodes``): bounded in time, but a call that hangs keeps its thread, and one that
crashes the interpreter or exhausts memory takes the generator down. With ``isolation: actor``
the generator starts an :class:`EnvironmentHost` (a Ray actor, no CPU reserved) and talks to it
through :class:`RemoteEnvironment`, which has the environment interface: the environment's state
(its episodes) lives in the host, a call past ``timeout_s`` gets the host killed and started
afresh (Ray restarts it), and a host that dies ends the episodes it held (``environment:lost``);
the generator, and the run, go on.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import ray

from actors.episodes import Episode, EpisodeSpec, Fault, HostedEnvironment, Step

HOST_THREADS = 256  # calls a host runs at once; more episodes of one generator waiting on slow
# steps queue in the host, and their time there counts against ``timeout_s``
CALL_SLACK_S = 1.0  # a remote call's own limit beyond the runner's, so the runner's fires first


class EnvironmentHost:
    """The environment of ``spec`` and its episodes, by key, in this (actor) process."""

    def __init__(self, spec: EpisodeSpec):
        from actors.environments import make_environment

        self.environment = make_environment(spec)
        self.episodes: dict[str, Episode] = {}

    def stop(self) -> tuple[str, ...]:
        return tuple(self.environment.stop)

    def reset(self, key: str, row: Mapping[str, Any]) -> None:
        episode = self.environment.reset(row)
        if not isinstance(episode, Episode):
            raise Fault("environment", "garbage", f"reset returned {type(episode).__name__}")
        self.episodes[key] = episode

    def step(self, key: str, turn: str) -> Step | Fault:
        if key not in self.episodes:  # started before this host was: restarted meanwhile
            return Fault("environment", "lost", "its actor was restarted")
        try:
            return self.episodes[key].step(turn)
        except Fault as fault:  # a tool's fault, returned to be raised in the generator
            return fault

    def tool_in_call(self, key: str) -> str | None:
        return getattr(self.episodes.get(key), "tool_in_call", None)

    def forget(self, keys: Sequence[str]) -> None:
        for key in keys:
            self.episodes.pop(key, None)


class RemoteEnvironment(HostedEnvironment):
    """The environment interface over an :class:`EnvironmentHost` actor (see the module
    docstring). ``restart()`` kills the host (Ray starts it again, empty)."""

    def __init__(self, spec: EpisodeSpec):
        self.spec = spec
        host = ray.remote(EnvironmentHost).options(
            num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=HOST_THREADS
        )
        self.handle = host.remote(spec)
        self.stop = self._call(self.handle.stop, timeout=120.0)  # the host's start included
        self._keys = itertools.count()
        self.live: set[str] = set()

    def _call(self, method, *args, timeout: float | None = None):
        limit = timeout or self.spec.timeout_s + CALL_SLACK_S
        try:
            result = ray.get(method.remote(*args), timeout=limit)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            raise Fault("environment", "lost", "its actor died or was restarted") from e
        except ray.exceptions.RayTaskError as e:
            raise Fault("environment", "raised", str(e.cause or e)[:200]) from None
        if isinstance(result, Fault):
            raise result
        return result

    def reset(self, row: Mapping[str, Any]) -> _RemoteEpisode:
        key = f"{next(self._keys)}"
        self._call(self.handle.reset, key, dict(row))
        self.live.add(key)
        return _RemoteEpisode(self, key)

    def blame(self, episodes) -> list[str | None]:
        """The tool each episode is calling, asked of the host all at once (its other threads
        answer while one hangs), waiting at most ``CALL_SLACK_S`` for all of them."""
        refs = [
            self.handle.tool_in_call.remote(e.key) if isinstance(e, _RemoteEpisode) else None
            for e in episodes
        ]
        live = [r for r in refs if r is not None]
        ready, _ = ray.wait(live, num_returns=len(live), timeout=CALL_SLACK_S) if live else ([], [])
        done = set(ready)
        out = []
        for ref in refs:
            try:
                out.append(ray.get(ref, timeout=CALL_SLACK_S) if ref in done else None)
            except Exception:  # noqa: BLE001 - a host that cannot say: blame the environment
                out.append(None)
        return out

    def restart(self) -> None:
        """A call hung: kill the host (its episodes are lost; Ray starts it afresh)."""
        ray.kill(self.handle, no_restart=False)
        self.live.clear()

    def forget(self) -> None:
        """Drop the finished batch's episodes from the host."""
        keys, self.live = sorted(self.live), set()
        if keys:
            self.handle.forget.remote(keys)


class _RemoteEpisode:
    def __init__(self, environment: RemoteEnvironment, key: str):
        self.environment, self.key = environment, key

    def step(self, turn: str) -> Step:
        return self.environment._call(self.environment.handle.step, self.key, turn)
