"""A frozen reward model read at the last real token of each response.

Two kinds of checkpoint load (safetensors only, ``trust_remote_code`` off unless asked):

- a Hugging Face ``*ForSequenceClassification`` model with one label (its ``score`` head);
- a causal LM with a value head: the LM's body plus ``value_head.safetensors`` (``weight``
  (1, H), ``bias`` (1,)) in the same directory, as :mod:`learner.engine` exports one.

The score is the head's output at the last real token of prompt + response (for a finished
response that is its EOS token; arXiv 2403.17031, "reward model score at EOS"). The position is
taken from the attention mask, never from the pad token id: HF's own pooling looks for the first
pad token, which is wrong when pad == EOS (as in many tokenizers, and the demo's) and with left
padding. Position ids come from the mask too, so left- and right-padded batches give the same
score.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from rollout import schema as S
from rollout.ops import token_ranges

VALUE_HEAD_FILE = "value_head.safetensors"


def head_kind(config, path: str) -> str:
    """How the reward model at ``path`` (its ``config``, a transformers config) is read:
    ``"classifier"`` (a one-label ``*ForSequenceClassification``) or ``"value_head"`` (a causal
    LM with ``value_head.safetensors`` beside it).

    Raises:
        ValueError: a classifier with more than one label, or neither kind.
    """
    architectures = config.architectures or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        if config.num_labels != 1:
            raise ValueError(
                f"reward model {path}: a sequence-classification head with {config.num_labels} "
                "labels; a reward model has exactly one (num_labels=1)"
            )
        return "classifier"
    if not os.path.isfile(os.path.join(path, VALUE_HEAD_FILE)):
        raise ValueError(
            f"reward model {path}: neither a *ForSequenceClassification checkpoint nor a causal "
            f"LM with {VALUE_HEAD_FILE}; save the model with a one-label classification head"
        )
    return "value_head"


def same_vocabulary(a, b) -> bool:
    """Whether two tokenizers map every token to the same id (token ids pass between them)."""
    return a.get_vocab() == b.get_vocab()


def _load(path: str, dtype: str, trust_remote_code: bool) -> tuple[nn.Module, nn.Module]:
    """``(body, head)``: the transformer body (hidden states) and the scalar head."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    kwargs = dict(
        dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=trust_remote_code
    )
    if head_kind(config, path) == "classifier":
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
        head = getattr(model, "score", None) or getattr(model, "classifier", None)
        if head is None:
            raise ValueError(f"reward model {path}: no 'score' or 'classifier' head found")
        return model.base_model, head
    head_file = os.path.join(path, VALUE_HEAD_FILE)
    from safetensors.torch import load_file

    lm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    state = load_file(head_file)
    head = nn.Linear(state["weight"].shape[1], 1).to(getattr(torch, dtype))
    head.load_state_dict(state)
    return lm.get_decoder(), head


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last position whose mask is 1, whatever side the padding is on."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(dim=1)


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_token_id: int, side: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both (B, T), padded on ``side`` ("left" or "right")."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        n = len(seq)
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        ids[i, cols] = torch.tensor(seq, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def token_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped so each group holds at most ``max_tokens`` tokens summed over its
    sequences, unpadded (a longer sequence goes alone): ``rollout.ops.split_by_tokens``'s cut,
    the learner's and the reference model's, made over the sequences sorted by length so that
    little is spent on padding."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    ranges = token_ranges([lengths[i] for i in order], max_tokens)
    return [[order[i] for i in r] for r in ranges]


class RewardModel:
    """A frozen scalar reward model over token sequences or text.

    Args:
        path: local directory or hub name.
        micro_batch_tokens: most prompt + response tokens (unpadded, summed over the
            sequences) per forward, as the learner counts them.
        padding_side: "right" or "left"; the scores do not depend on it.
    """

    def __init__(
        self,
        path: str,
        *,
        dtype: str = "float32",
        micro_batch_tokens: int = 4096,
        padding_side: str = "right",
        trust_remote_code: bool = False,
    ):
        from transformers import AutoTokenizer

        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.body, self.head = _load(path, dtype, trust_remote_code)
        self.device = "cuda:0" if torch.cuda.is_available() else "cpu"
        for module in (self.body, self.head):
            module.eval().requires_grad_(False).to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id or 0
        self.micro_batch_tokens = micro_batch_tokens
        self.padding_side = padding_side

    @torch.inference_mode()
    def score_ids(self, sequences: Sequence[Sequence[int]]) -> list[float]:
        """One score per token sequence (prompt + response, in this model's vocabulary)."""
        if any(len(s) == 0 for s in sequences):
            raise ValueError("cannot score an empty sequence")
        scores = np.zeros(len(sequences), np.float32)
        for group in token_batches([len(s) for s in sequences], self.micro_batch_tokens):
            ids, mask = pad_batch(
                [sequences[i] for i in group], self.pad_token_id, self.padding_side
            )
            ids, mask = ids.to(self.device), mask.to(self.device)
            position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
            hidden = self.body(
                input_ids=ids, attention_mask=mask, position_ids=position_ids
            ).last_hidden_state  # (B, T, H)
            last = last_token_index(mask)
            values = self.head(hidden[torch.arange(len(group)), last]).squeeze(-1)  # (B,)
            scores[group] = values.float().cpu().numpy()
        return scores.tolist()

    def encode(self, prompt: str, response: str, finished: bool) -> list[int]:
        """``prompt + response`` in this model's vocabulary; a finished response gets EOS, as
        the reward model saw its training responses end."""
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = ids + self.tokenizer(response, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        if finished and eos is not None:
            ids.append(eos)
        return ids

    def score_texts(
        self, prompts: Sequence[str], responses: Sequence[str], finished: Sequence[bool] = ()
    ) -> list[float]:
        """Scores of decoded text (a remote service, or a policy with another tokenizer)."""
        done = list(finished) or [True] * len(prompts)
        return self.score_ids(
            [self.encode(p, r, f) for p, r, f in zip(prompts, responses, done, strict=True)]
        )


class RewardModelScorer:
    """One reward model as a reward component of a run: the ``reward/<name>`` column.

    When the reward model's vocabulary is the policy's, the rollout's token ids go in as they
    are; otherwise prompt and response are decoded with the policy's tokenizer and re-encoded
    with the reward model's (the count is in ``reward/<name>/retokenized``).
    """

    def __init__(
        self,
        name: str,
        path: str,
        policy_tokenizer_path: str,
        *,
        dtype: str = "float32",
        micro_batch_tokens: int = 4096,
        padding_side: str = "right",
        trust_remote_code: bool = False,
    ):
        from transformers import AutoTokenizer

        self.name = name
        self.model = RewardModel(
            path,
            dtype=dtype,
            micro_batch_tokens=micro_batch_tokens,
            padding_side=padding_side,
            trust_remote_code=trust_remote_code,
        )
        self.policy_tokenizer = AutoTokenizer.from_pretrained(
            policy_tokenizer_path, trust_remote_code=trust_remote_code
        )
        self.same_vocab = same_vocabulary(self.policy_tokenizer, self.model.tokenizer)

    def score(self, table: pa.Table) -> tuple[pa.Table, dict[str, float]]:
        """``(table of one column reward/<name>, metrics)`` for the rollout ``table``."""
        prompts = S.column_array(table, S.PROMPT_TOKEN_IDS).to_pylist()
        responses = S.column_array(table, S.RESPONSE_TOKEN_IDS).to_pylist()
        if self.same_vocab:
            scores = self.model.score_ids([p + r for p, r in zip(prompts, responses, strict=True)])
        else:
            finished = [f == "stop" for f in S.column_array(table, S.FINISH_REASON).to_pylist()]
            decode = self.policy_tokenizer.batch_decode
            scores = self.model.score_texts(
                decode(prompts, skip_special_tokens=True),
                decode(responses, skip_special_tokens=True),
                finished,
            )
        column = S.REWARD_COLUMN_PREFIX + self.name
        metrics = {
            f"reward/{self.name}/mean": float(np.mean(scores)),
            f"reward/{self.name}/retokenized": 0.0 if self.same_vocab else float(len(scores)),
        }
        return pa.table({column: pa.array(scores, pa.float32())}), metrics

    def problems(self) -> dict:
        """A reward model scores every sample it is given (an error fails the call instead):
        nothing to report."""
        return {}
