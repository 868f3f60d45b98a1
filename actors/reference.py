"""The frozen reference policy: appends ``ref_logprobs`` to a rollout table.

A plain class, run by the driver as a Ray actor. It computes log-probabilities exactly as the
learner does (``learner.models.policy_forward``: logits only at response positions, divided by
the sampling temperature, gathered logit minus logsumexp), batched by tokens, without
gradients.
"""

from __future__ import annotations

import pyarrow as pa
import torch

from learner.models import LOGITS_CHUNK_BYTES, load_causal_lm, policy_forward
from rollout import schema as S
from rollout.ops import append_columns, split_by_tokens
from rollout.tensors import to_list_column, to_padded


class ReferenceModel:
    """A frozen Hugging Face causal LM.

    Args:
        model_path: directory or hub name (safetensors weights only).
        temperature: the generator's sampling temperature.
        micro_batch_tokens: most tokens (prompt + response, unpadded, summed over the rows) per
            forward.
        pad_token_id: id used for padding.
        logits_chunk_bytes: most memory the full-vocabulary logits take at once.
    """

    def __init__(
        self,
        model_path: str,
        *,
        temperature: float,
        micro_batch_tokens: int,
        pad_token_id: int,
        logits_chunk_bytes: int = LOGITS_CHUNK_BYTES,
        dtype: str = "float32",
        trust_remote_code: bool = False,
    ):
        self.model = load_causal_lm(model_path, dtype=dtype, trust_remote_code=trust_remote_code)
        self.model.eval().requires_grad_(False)
        self.device = "cuda:0" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device)
        self.temperature = temperature
        self.micro_batch_tokens = micro_batch_tokens
        self.pad_token_id = pad_token_id
        self.logits_chunk_bytes = logits_chunk_bytes

    @torch.inference_mode()
    def logprobs(self, table: pa.Table) -> pa.Table:
        """``table`` with a ``ref_logprobs`` column (one entry per response token)."""
        chunks = []
        for part in split_by_tokens(table, self.micro_batch_tokens):
            batch = to_padded(part, pad_token_id=self.pad_token_id)
            if self.device != "cpu":
                batch = batch.to(self.device)
            out = policy_forward(
                self.model,
                batch,
                temperature=self.temperature,
                chunk_bytes=self.logits_chunk_bytes,
            )
            chunks.append(to_list_column(out.logprobs, batch.response_mask))
        return append_columns(table, {S.REF_LOGPROBS: pa.chunked_array(chunks, S.PER_TOKEN_TYPE)})
