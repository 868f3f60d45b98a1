"""Learner recovery: a rank that died takes the group down (ranks are never restarted: one that
died is gone); the run rebuilds the whole group and continues from its last committed checkpoint,
or from the start, at most ``cluster.max_failures`` times.

Generators and reward actors are restarted by Ray; the generator pool brings a restarted
replica back to the current weights (``orchestration.generators``).
"""

from __future__ import annotations

import time
from pathlib import Path

from orchestration.config import RunConfig


class Recovery:
    """Rebuilds the learner group after a rank died and rolls the loop back."""

    def __init__(self, cfg: RunConfig, model_path: str, pad_token_id: int, run_dir: Path):
        self.cfg, self.model_path, self.pad_token_id = cfg, model_path, pad_token_id
        self.run_dir = run_dir
        self.failures = 0  # learner group rebuilds so far
        self.initial_state: dict | None = None  # what a rollback with no checkpoint restores

    def remember(self, loop) -> None:
        """Keep the loop's starting state: a rollback before the first checkpoint restores it."""
        from orchestration.checkpoint import rng_states

        self.initial_state = loop.state_dict() | {"rng": rng_states()}

    def learner_died(self, error: Exception, learners: list) -> bool:
        """Whether ``error`` came with a dead learner rank."""
        import ray

        from orchestration import calls

        if not isinstance(error, ray.exceptions.RayError):
            return False
        timeout = self.cfg.cluster.call_timeout_s
        for rank in learners:
            try:
                calls.wait(rank.__ray_ready__.remote(), "learner check", timeout)
            except ray.exceptions.RayActorError:
                return True
        return False

    def rollback(self, loop, log, error: Exception) -> int:
        """Rebuild the learner group, reopen the weight sync, and continue from the last
        committed checkpoint (or the start); returns the next iteration. Past
        ``cluster.max_failures`` the error stands."""
        from orchestration import checkpoint, placement

        self.failures += 1
        limit = self.cfg.cluster.max_failures
        if self.failures > limit:
            raise RuntimeError(
                f"the learner group failed {self.failures} times (cluster.max_failures={limit})"
            ) from error
        start = time.perf_counter()
        path, _ = checkpoint.find_latest(self.run_dir)
        print(
            f"learner: a rank died ({type(error).__name__}); rebuilding the group "
            f"(failure {self.failures} of at most {limit}) and resuming from "
            f"{path or 'the start'}",
            flush=True,
        )
        placement.rebuild_learners(self.cfg, loop.actors, self.model_path, self.pad_token_id)
        loop.stages.sync.reopen()
        if path is not None:
            k = loop.restore(path)
        else:
            loop.load_state_dict(self.initial_state)
            checkpoint.set_rng_states(self.initial_state["rng"])
            loop.stages.pool.restore(0)
            k = -1
        log.rewind(k)
        loop.stages.faults.count("learner_rebuilds", time.perf_counter() - start)
        print(f"learner: rebuilt in {time.perf_counter() - start:.1f} s", flush=True)
        return k + 1
