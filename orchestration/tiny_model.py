"""A tiny Qwen2-style causal LM and tokenizer, built locally (no hub), for the demo and tests.

The tokenizer is a byte-level BPE trained on the task's own text, wrapped in
``PreTrainedTokenizerFast``; loaded back through ``AutoTokenizer`` (as vLLM loads it) both sides
agree. The weights are random: the demo learns its task from scratch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the demo model (about 0.4M parameters at the defaults)."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 2  # head size 64, one the vLLM CPU attention kernels support
    max_positions: int = 128
    seed: int = 0


def build_tiny_model(
    path: str, corpus: Iterable[str], spec: TinyModelSpec = TinyModelSpec()
) -> str:
    """Train a tokenizer on ``corpus``, make a random model for it, save both (safetensors) at
    ``path``; returns ``path``. A directory that already holds a model is left as it is."""
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=64, special_tokens=[EOS], show_progress=False)
    tokenizer.train_from_iterator(list(corpus), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS)

    config = Qwen2Config(
        vocab_size=len(fast),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=False,
        eos_token_id=fast.eos_token_id,
        bos_token_id=fast.eos_token_id,
        pad_token_id=fast.eos_token_id,
    )
    torch.manual_seed(spec.seed)
    model = Qwen2ForCausalLM(config).float()
    tmp = f"{path}.tmp-{os.getpid()}"
    fast.save_pretrained(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if os.path.isdir(path) and not os.listdir(path):
        os.rmdir(path)
    os.replace(tmp, path)  # whole directory at once: a crash leaves no half-written model
    return path
