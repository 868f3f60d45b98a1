"""Run health guards: after each iteration, conditions that make the run's updates worthless,
each a warning the first times and a stop (with a checkpoint and its own exit code) when it
lasts.

1. **Numerical faults** (exit code 3): ``learner.max_skipped_in_a_row`` updates in a row dropped
   for a non-finite loss or gradient norm.
2. **Off-policy generators** (exit code 4): ``rollout/logprob_mismatch`` (the mean of
   ``|rollout_logprobs - old_logprobs|`` over response tokens) above
   ``generator.max_logprob_mismatch`` for ``generator.max_mismatch_in_a_row`` iterations: the
   generators sample from another policy than the one the learner trains.
3. **Nothing scorable** (exit code 5): every sample of an iteration unscorable for
   ``reward.max_unscorable_in_a_row`` iterations: the learner trains on nothing.

Plain classes: the numerical-fault guard reads the train stage's count, the others the
iteration's metrics. The loop (``orchestration.loop``) checks them after logging each
iteration, saves a checkpoint when one stops the run, and the entry point exits with its code.
"""

from __future__ import annotations

from collections.abc import Callable

from orchestration.config import RunConfig

# Default generator.max_logprob_mismatch by model.dtype, from what same-weight engines measure
# here (mean over response tokens, vLLM CPU against transformers, temperature 1): float32
# 1e-7 (tiny models) to 6e-6 (SmolLM2-135M), while one missed update at lr 1e-3 on a tiny model
# is 2.5e-2; bfloat16 4.5e-2 on SmolLM2-135M from rounding alone, so its bound only catches gross
# breakage.
DEFAULT_MAX_MISMATCH = {"float32": 1e-3, "bfloat16": 1e-1}

LIKELY_MISMATCH_CAUSES = (
    "likely causes: new weights not reaching what the engine computes with (a sync path or a "
    "vLLM version that leaves a module on old weights; weight_sync.verify_checksum=true checks "
    "every sync), 16-bit kernels (raise generator.max_logprob_mismatch), a sync that is off or "
    "failing, or the learner and generators running different temperatures or checkpoints"
)


class RunStopped(RuntimeError):
    """A guard stopped the run; ``exit_code`` is what the entry point returns."""

    exit_code = 1


class NumericalFault(RunStopped):
    """Too many updates in a row were dropped for non-finite losses or gradients."""

    exit_code = 3


class OffPolicy(RunStopped):
    """The generators' log-probabilities stayed away from the learner's."""

    exit_code = 4


class NothingScorable(RunStopped):
    """No sample could be scored for several iterations in a row."""

    exit_code = 5


def max_mismatch(cfg: RunConfig) -> float:
    """The configured mismatch bound, or the default for the model's dtype."""
    bound = cfg.generator.max_logprob_mismatch
    return bound if bound is not None else DEFAULT_MAX_MISMATCH[cfg.model.dtype]


class Guards:
    """Counts each condition's run of bad iterations.

    Args:
        describe_unscorable: called when the run stops for unscorable samples; says which reward
            components failed and how (the reward stage's first error per function).
    """

    def __init__(self, cfg: RunConfig, describe_unscorable: Callable[[], str] = lambda: ""):
        self.cfg = cfg
        self.max_mismatch = max_mismatch(cfg)
        self.describe_unscorable = describe_unscorable
        self.mismatch_in_a_row = 0
        self.unscorable_in_a_row = 0

    def check(self, k: int, metrics: dict[str, float]) -> list[str]:
        """Warnings for iteration ``k`` from its metrics; raises a :class:`RunStopped` when a
        condition has lasted its limit (the message says what to do; the caller adds where the
        checkpoint is)."""
        return self._mismatch(k, metrics) + self._unscorable(k, metrics)

    def numerical(self, k: int, skipped_in_a_row: int) -> list[str]:
        """Raises :class:`NumericalFault` when the learner has dropped
        ``learner.max_skipped_in_a_row`` updates in a row (the train stage's count)."""
        bad, limit = skipped_in_a_row, self.cfg.learner.max_skipped_in_a_row
        if bad >= limit:
            raise NumericalFault(
                f"iteration {k}: {bad:.0f} updates in a row were dropped for a non-finite loss "
                f"or gradient norm (learner.max_skipped_in_a_row={limit}); the run stopped. "
                "Look at the rewards and advantages in the rollouts, lower learner.lr, then "
                "resume=auto"
            )
        return []

    def _mismatch(self, k: int, metrics: dict[str, float]) -> list[str]:
        if self.cfg.max_staleness:  # older weights sampled on purpose: off_policy/* shows it
            return []
        value = metrics.get("rollout/logprob_mismatch")
        if value is None:
            return []
        if value <= self.max_mismatch:  # (NaN is not: it counts as off-policy)
            self.mismatch_in_a_row = 0
            return []
        self.mismatch_in_a_row += 1
        limit = self.cfg.generator.max_mismatch_in_a_row
        what = (
            f"iteration {k}: the generators are off the learner's policy: "
            f"rollout/logprob_mismatch={value:.3g} > generator.max_logprob_mismatch="
            f"{self.max_mismatch:g}"
        )
        if self.mismatch_in_a_row >= limit:
            raise OffPolicy(
                f"{what} for {self.mismatch_in_a_row} iterations in a row "
                f"(generator.max_mismatch_in_a_row={limit}); the run stopped. "
                f"{LIKELY_MISMATCH_CAUSES}. Fix the cause, then resume=auto"
            )
        return [
            f"warning: {what} ({self.mismatch_in_a_row} of {limit} before the run stops); "
            f"{LIKELY_MISMATCH_CAUSES}"
        ]

    def _unscorable(self, k: int, metrics: dict[str, float]) -> list[str]:
        fraction = metrics.get("reward/unscorable_fraction")
        if fraction is None or fraction < 1:
            self.unscorable_in_a_row = 0
            return []
        self.unscorable_in_a_row += 1
        limit = self.cfg.reward.max_unscorable_in_a_row
        what = f"iteration {k}: no sample could be scored"
        if self.unscorable_in_a_row >= limit:
            detail = self.describe_unscorable()
            raise NothingScorable(
                f"{what}, {self.unscorable_in_a_row} iterations in a row "
                f"(reward.max_unscorable_in_a_row={limit}); the run stopped: it was training on "
                f"nothing.{' ' + detail if detail else ''} Fix the reward, then resume=auto"
            )
        return [
            f"warning: {what} ({self.unscorable_in_a_row} of {limit} in a row before the "
            "run stops); the update teaches nothing"
        ]
