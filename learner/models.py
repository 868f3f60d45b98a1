"""Loading models and running them over rollout batches: the policy, the critic, their forwards.

Everything here runs without Ray and without DeepSpeed; the learner and the reference model
both use it, so the learner and the reference compute log-probabilities the same way.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from learner.functional import entropy_from_logits, logprobs_from_logits
from rollout.tensors import PaddedBatch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_path(path: str) -> None:
    """Raise FileNotFoundError unless ``path`` is an existing directory or reads as a hub name
    (``org/name``, resolved later by transformers)."""
    if os.path.isdir(os.path.expanduser(path)):
        return
    is_hub_name = path.count("/") == 1 and not path.startswith((".", "~", "/"))
    if not is_hub_name:
        raise FileNotFoundError(f"model path {path!r} does not exist")


def load_causal_lm(path: str, *, dtype: str = "float32", trust_remote_code: bool = False):
    """A Hugging Face causal LM from a local directory or hub name, weights from safetensors only.

    ``trust_remote_code`` stays off unless the caller turns it on (it runs the checkpoint's Python).
    """
    from transformers import AutoModelForCausalLM

    check_model_path(path)
    return AutoModelForCausalLM.from_pretrained(
        path,
        dtype=DTYPES[dtype],
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
        attn_implementation="sdpa",
    )


class CriticModel(nn.Module):
    """A value model: a causal LM's transformer body with a scalar head on every position.

    Initialised from the policy's checkpoint (no reward model in the loop to start from) with a
    fresh head drawn from N(0, 1/sqrt(d+1)) and zero bias, the reward/value-head initialisation of
    "The N+ Implementation Details of RLHF with PPO" (arXiv 2403.17031).
    """

    def __init__(self, body: nn.Module, hidden_size: int):
        super().__init__()
        self.body = body
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.value_head.weight, std=1.0 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.value_head.bias)

    @classmethod
    def from_pretrained(
        cls, path: str, *, dtype: str = "float32", trust_remote_code: bool = False
    ) -> CriticModel:
        """The body of the causal LM at ``path`` (its LM head dropped) plus a new value head."""
        lm = load_causal_lm(path, dtype=dtype, trust_remote_code=trust_remote_code)
        critic = cls(lm.get_decoder(), lm.config.hidden_size)
        return critic.to(DTYPES[dtype])

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        """(B, S) values, one per position."""
        hidden = self.body(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state
        return self.value_head(hidden).squeeze(-1)


@dataclass(frozen=True)
class PolicyOutputs:
    """Per-token outputs of a policy forward over a batch's responses, all (B, R)."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None


def policy_forward(
    model: nn.Module,
    batch: PaddedBatch,
    *,
    temperature: float,
    with_entropy: bool = False,
) -> PolicyOutputs:
    """Log-probabilities (and entropy) of each response token under ``model``.

    The logit at position ``P - 1 + t`` predicts response token ``t``; logits are divided by
    ``temperature`` before normalising, the convention the generator samples with, so the result
    is comparable with ``rollout_logprobs``.
    """
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).logits
    p, r = batch.prompt_width, batch.response_ids.shape[1]
    response_logits = logits[:, p - 1 : p - 1 + r]  # (B, R, V)
    logprobs = logprobs_from_logits(response_logits, batch.response_ids, temperature)
    entropy = None
    if with_entropy:
        entropy = entropy_from_logits(response_logits.float() / temperature)
    return PolicyOutputs(logprobs=logprobs, entropy=entropy)


def critic_forward(critic: nn.Module, batch: PaddedBatch) -> torch.Tensor:
    """(B, R) values: ``V_t`` is read where response token ``t`` is predicted (position P-1+t)."""
    values = critic(batch.input_ids, batch.attention_mask, batch.position_ids)
    p, r = batch.prompt_width, batch.response_ids.shape[1]
    return values[:, p - 1 : p - 1 + r].float()
