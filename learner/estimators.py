"""The advantage estimators by name, and the setup choices that follow from each one.

Imports nothing heavy (no torch), so the run configuration can name an estimator and read its
choices without loading the math. The math itself, one function per estimator, is in
``learner.algorithms`` (``compute_advantages``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

__all__ = ["ESTIMATOR_SPECS", "AdvantageEstimator", "AggMode", "EstimatorSpec"]

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
"""How per-token losses are reduced to one number (``learner.losses.aggregate``)."""


class AdvantageEstimator(str, enum.Enum):
    """How advantages are computed; the config names one of these."""

    GAE = "gae"  # PPO with a critic
    GRPO = "grpo"
    DR_GRPO = "dr_grpo"
    RLOO = "rloo"
    REINFORCE_PP = "reinforce_pp"


@dataclass(frozen=True)
class EstimatorSpec:
    """The setup choices that follow from an estimator.

    Attributes:
        needs_critic: a value model is trained (PPO).
        kl_in_reward: the KL penalty goes into ``learner.algorithms.token_rewards`` (True) or
            into the loss as ``learner.algorithms.kl_loss`` (False, GRPO-style).
        loss_agg: the loss aggregation the method is defined with (GRPO averages per sequence,
            Dr. GRPO sums tokens per sequence without length normalisation); the config's
            default when it names none.
        needs_groups: the estimator compares the samples of one prompt with each other (its
            baseline is the group's), so it needs at least two samples per prompt.
    """

    needs_critic: bool
    kl_in_reward: bool
    loss_agg: AggMode
    needs_groups: bool


ESTIMATOR_SPECS: dict[AdvantageEstimator, EstimatorSpec] = {
    AdvantageEstimator.GAE: EstimatorSpec(
        needs_critic=True, kl_in_reward=True, loss_agg="token-mean", needs_groups=False
    ),
    AdvantageEstimator.GRPO: EstimatorSpec(
        needs_critic=False, kl_in_reward=False, loss_agg="seq-mean-token-mean", needs_groups=True
    ),
    AdvantageEstimator.DR_GRPO: EstimatorSpec(
        needs_critic=False, kl_in_reward=False, loss_agg="seq-mean-token-sum", needs_groups=True
    ),
    AdvantageEstimator.RLOO: EstimatorSpec(
        needs_critic=False, kl_in_reward=False, loss_agg="token-mean", needs_groups=True
    ),
    AdvantageEstimator.REINFORCE_PP: EstimatorSpec(
        needs_critic=False, kl_in_reward=True, loss_agg="token-mean", needs_groups=False
    ),
}
"""The one table from estimator to its setup choices; the driver looks its estimator up once."""
