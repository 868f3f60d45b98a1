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


VALUE_HEAD_FILE = "value_head.safetensors"
"""A value-head reward model's head, beside its causal LM: ``weight`` (1, H) and ``bias`` (1,),
the format ``reward_service.reward_model`` reads and ``learner.engine`` exports (the two
roles share no module; a test checks that the names agree)."""


class CriticModel(nn.Module):
    """A value model: a causal LM's transformer body with a scalar head on every position.

    A fresh head is drawn from N(0, 1/sqrt(d+1)) with zero bias, the reward/value-head
    initialisation of "The N+ Implementation Details of RLHF with PPO" (arXiv 2403.17031); N+
    initialises the critic from the reward model instead, which ``from_pretrained`` does when
    given one.
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
        """The critic from the checkpoint at ``path``, one of three kinds:

        - a causal LM (the policy's, by default): its body (LM head dropped), a fresh head;
        - a value-head reward model, a causal LM with ``VALUE_HEAD_FILE`` beside it: its body
          and that head;
        - a one-label ``*ForSequenceClassification`` reward model: its body and its ``score``
          head (bias 0 where the head has none, as in transformers' decoder classifiers).

        Raises:
            ValueError: a classifier with other than one label or without a ``score`` head, or
                a value head whose shapes do not fit the body.
        """
        from transformers import AutoConfig

        check_model_path(path)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        hidden_size = config.get_text_config().hidden_size
        if any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
            body, weight, bias = _classifier_parts(path, config, dtype, trust_remote_code)
        else:
            lm = load_causal_lm(path, dtype=dtype, trust_remote_code=trust_remote_code)
            body, weight, bias = lm.get_decoder(), None, None
            head_file = os.path.join(os.path.expanduser(path), VALUE_HEAD_FILE)
            if os.path.isfile(head_file):
                from safetensors.torch import load_file

                state = load_file(head_file)
                if set(state) != {"weight", "bias"}:
                    raise ValueError(
                        f"critic checkpoint {path}: {VALUE_HEAD_FILE} holds {sorted(state)}; a "
                        "value head is exactly 'weight' (1, H) and 'bias' (1,)"
                    )
                weight, bias = state["weight"], state["bias"]
        critic = cls(body, hidden_size)
        if weight is not None:
            if weight.shape != (1, hidden_size) or bias.shape != (1,):
                raise ValueError(
                    f"critic checkpoint {path}: its value head has weight {tuple(weight.shape)} "
                    f"and bias {tuple(bias.shape)}; the body's hidden size {hidden_size} needs "
                    f"weight (1, {hidden_size}) and bias (1,)"
                )
            with torch.no_grad():
                critic.value_head.weight.copy_(weight)
                critic.value_head.bias.copy_(bias)
        return critic.to(DTYPES[dtype])

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        """(B, S) values, one per position."""
        hidden = self.body(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state
        return self.value_head(hidden).squeeze(-1)


def _classifier_parts(path: str, config, dtype: str, trust_remote_code: bool):
    """``(body, weight (1, H), bias (1,))`` of a one-label sequence classifier."""
    from transformers import AutoModelForSequenceClassification

    if config.num_labels != 1:
        raise ValueError(
            f"critic checkpoint {path}: a sequence-classification head with {config.num_labels} "
            "labels; a reward model to start a critic from has exactly one"
        )
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        dtype=DTYPES[dtype],
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
        attn_implementation="sdpa",
    )
    head = getattr(model, "score", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"critic checkpoint {path}: {type(model).__name__} has no linear 'score' head; save "
            f"the reward model as its causal LM with {VALUE_HEAD_FILE} (weight (1, H), bias (1,))"
        )
    weight = head.weight.detach()
    bias = head.bias.detach() if head.bias is not None else torch.zeros(1, dtype=weight.dtype)
    return model.base_model, weight, bias


@dataclass(frozen=True)
class PolicyOutputs:
    """Per-token outputs of a policy forward over a batch's responses, all (B, R) float32; 0 at
    padded response positions."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None


LOGITS_CHUNK_BYTES = 256 << 20
"""Default most bytes of float32 full-vocabulary logits held at once (see ``policy_forward``)."""


def plain_head(model: nn.Module) -> nn.Module | None:
    """The output layer when the model's logits are just ``head(last_hidden_state)`` (Llama,
    Qwen2, Mistral, GPT-2 and most causal LMs), else None: a model that scales or soft-caps its
    logits (Gemma 2, Cohere) takes the whole forward instead."""
    head = model.get_output_embeddings()
    config = model.config
    if not isinstance(head, nn.Linear) or model.get_decoder() is model:
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    return head


def _token_stats(
    head: nn.Module,
    hidden: torch.Tensor,
    ids: torch.Tensor,
    temperature: float,
    entropy: bool,
    entropy_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of ``ids`` (N,) and entropy (N,) (empty unless ``entropy``; without
    ``entropy_grad`` a detached metric) from the hidden states (N, H) of the positions that
    predict them."""
    logits = head(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    # log_softmax then gather: on CPU 10% faster than logsumexp (and 20% with backward), its
    # (N, V) output bounded by the chunk
    logp = logits.log_softmax(-1)
    logprobs = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    if not entropy:
        return logprobs, logprobs.new_zeros(0)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        z = logp if entropy_grad else logp.detach()
        return logprobs, -(z.exp() * z).sum(-1)


def policy_forward(
    model: nn.Module,
    batch: PaddedBatch,
    *,
    temperature: float,
    with_entropy: bool = False,
    entropy_grad: bool = True,
    chunk_bytes: int = LOGITS_CHUNK_BYTES,
) -> PolicyOutputs:
    """Log-probabilities (and entropy) of each response token under ``model``.

    The hidden state at position ``P - 1 + t`` predicts response token ``t``; its logits are
    divided by ``temperature`` before normalising, the convention the generator samples with,
    so the result is comparable with ``rollout_logprobs``.

    Logits exist only where they are used: the output head runs on the hidden states of the
    real (unpadded) response positions, never on prompt positions, in chunks whose float32
    logits take at most ``chunk_bytes``. With gradients on and more than one chunk, each chunk
    is checkpointed (its logits are recomputed in backward), so memory stays bounded however
    long the responses grow. Without a plain head (``plain_head``), the model's own forward
    computes the response positions' logits (``logits_to_keep``), unchunked.

    ``entropy_grad=False``: the entropy is a metric only (no entropy bonus in the loss), computed
    without autograd, so it adds no backward work.
    """
    p, r = batch.prompt_width, batch.response_ids.shape[1]
    mask = batch.response_mask.bool()
    ids = batch.response_ids[mask]
    head = plain_head(model)
    inputs = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "position_ids": batch.position_ids,
        "use_cache": False,
    }
    if head is None:  # the last r + 1 positions: P - 1 .. P + r - 1; the very last predicts none
        logits = model(**inputs, logits_to_keep=r + 1).logits[:, :r][mask]
        head, hidden = nn.Identity(), logits
    else:
        hidden = model.get_decoder()(**inputs).last_hidden_state[:, p - 1 : p - 1 + r][mask]
    vocab = model.config.get_text_config().vocab_size
    chunk = max(1, chunk_bytes // (4 * vocab))
    recompute = torch.is_grad_enabled() and hidden.requires_grad and hidden.shape[0] > chunk
    logprobs, entropy = [], []
    for start in range(0, hidden.shape[0], chunk):
        args = (head, hidden[start : start + chunk], ids[start : start + chunk])
        if recompute:
            from torch.utils.checkpoint import checkpoint

            lp, ent = checkpoint(
                _token_stats, *args, temperature, with_entropy, entropy_grad, use_reentrant=False
            )
        else:
            lp, ent = _token_stats(*args, temperature, with_entropy, entropy_grad)
        logprobs.append(lp)
        entropy.append(ent)

    def per_token(values: list[torch.Tensor]) -> torch.Tensor:
        flat = torch.cat(values) if values else hidden.new_zeros(0, dtype=torch.float32)
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(
            mask, flat
        )

    return PolicyOutputs(
        logprobs=per_token(logprobs), entropy=per_token(entropy) if with_entropy else None
    )


def critic_forward(critic: nn.Module, batch: PaddedBatch) -> torch.Tensor:
    """(B, R) values: ``V_t`` is read where response token ``t`` is predicted (position P-1+t)."""
    values = critic(batch.input_ids, batch.attention_mask, batch.position_ids)
    p, r = batch.prompt_width, batch.response_ids.shape[1]
    return values[:, p - 1 : p - 1 + r].float()
