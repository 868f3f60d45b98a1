"""A tiny causal LM and tokenizer, built locally (no hub), for the demo and tests.

The tokenizer is a byte-level BPE trained on the task's own text, wrapped in
``PreTrainedTokenizerFast``; loaded back through ``AutoTokenizer`` (as vLLM loads it) both sides
agree. The weights are random: the demo learns its task from scratch.

The demo's model is a Qwen2 with untied embeddings. The tests' model-family matrix builds the
shapes real small checkpoints have (:data:`FAMILY_MATRIX`): Qwen2 (attention bias) and Llama
(no bias), the output head tied to the input embedding or not, grouped-query attention or not.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the model (the demo's, about 0.4M parameters, at the defaults).

    ``family``: ``qwen2`` (RoPE, RMSNorm, bias on q/k/v) or ``llama`` (no attention bias).
    ``tie_embeddings``: the output head shares the input embedding's weight (most small real
    checkpoints). ``num_kv_heads``: fewer than ``num_heads`` for grouped-query attention; None:
    as many. ``vocab_size``: the embedding's rows, at least the tokenizer's (real checkpoints
    pad it); None: the tokenizer's size.
    """

    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 2  # head size 64, one the vLLM CPU attention kernels support
    max_positions: int = 128
    seed: int = 0
    family: Literal["qwen2", "llama"] = "qwen2"
    tie_embeddings: bool = False
    num_kv_heads: int | None = None
    vocab_size: int | None = None


FAMILY_MATRIX: dict[str, TinyModelSpec] = {
    "qwen2-untied": TinyModelSpec(),
    "qwen2-tied-gqa": TinyModelSpec(
        hidden_size=256, num_heads=4, num_kv_heads=2, tie_embeddings=True
    ),
    "llama-tied": TinyModelSpec(family="llama", tie_embeddings=True),
    "llama-tied-gqa": TinyModelSpec(
        family="llama", hidden_size=256, num_heads=4, num_kv_heads=1, tie_embeddings=True
    ),
}
"""The model shapes every change to loading, generation, sync or export is tested on."""


def build_tiny_model(
    path: str, corpus: Iterable[str], spec: TinyModelSpec = TinyModelSpec()
) -> str:
    """Train a tokenizer on ``corpus``, make a random model for it, save both (safetensors) at
    ``path``; returns ``path``. A directory that already holds a model is left as it is."""
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=64, special_tokens=[EOS], show_progress=False)
    tokenizer.train_from_iterator(list(corpus), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS)

    if spec.vocab_size is not None and spec.vocab_size < len(fast):
        raise ValueError(f"vocab_size={spec.vocab_size} is less than the tokenizer's {len(fast)}")
    config_cls, model_cls = {
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "llama": (LlamaConfig, LlamaForCausalLM),
    }[spec.family]
    config = config_cls(
        vocab_size=spec.vocab_size or len(fast),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads or spec.num_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=spec.tie_embeddings,
        eos_token_id=fast.eos_token_id,
        bos_token_id=fast.eos_token_id,
        pad_token_id=fast.eos_token_id,
    )
    torch.manual_seed(spec.seed)
    model = model_cls(config).float()
    tmp = f"{path}.tmp-{os.getpid()}"
    fast.save_pretrained(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if os.path.isdir(path) and not os.listdir(path):
        os.rmdir(path)
    os.replace(tmp, path)  # whole directory at once: a crash leaves no half-written model
    return path
