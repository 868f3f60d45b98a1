"""A second objective, in the tests only: plain next-token cross-entropy on the response tokens
(supervised fine-tuning), written against the engine's seam (``learner.objectives``) with no
change to the engine. It is the proof that a new training method is one small objective."""

from __future__ import annotations

from dataclasses import dataclass

from learner.losses import aggregate
from learner.models import policy_forward
from learner.objectives import Objective


@dataclass(frozen=True)
class NextTokenCE(Objective):
    """Mean negative log-likelihood of the response tokens (token-mean over the mini-batch)."""

    name = "next_token_ce"
    shares = frozenset({"sft/nll"})
    rates = frozenset({"sft/token_accuracy"})

    def micro_loss(self, model, models, batch, mask, counts, settings):
        out = policy_forward(models[model], batch, temperature=1.0)
        nll = aggregate(-out.logprobs, mask, "token-mean", num_tokens=counts.tokens)
        # log p > log 0.5: the response token is the argmax (a rate over this micro-batch)
        right = (out.logprobs.detach() > -0.6931).float()
        accuracy = (right * mask).sum() / mask.sum().clamp(min=1)
        return nll, {"sft/nll": nll.detach(), "sft/token_accuracy": accuracy}


@dataclass(frozen=True)
class Unlabelled(NextTokenCE):
    """Reports a metric it does not say how to aggregate: the engine must refuse it."""

    shares = frozenset()
