"""``rollout.tokenizer.load_tokenizer``: the generic fast class for a generic fast tokenizer in
a local directory, with what ``AutoTokenizer`` gives; ``AutoTokenizer`` for anything else."""

from __future__ import annotations

import json
import shutil

import pytest

from rollout.tokenizer import generic_fast, load_tokenizer

pytestmark = pytest.mark.unit

TEXTS = ["3+4=", "12+9=21<|endoftext|>", "4+4=8 and 1+0=1", ""]


def test_a_generic_fast_tokenizer_loads_without_the_registry_and_encodes_the_same(tiny_model):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    assert generic_fast(tiny_model)
    ours, auto = load_tokenizer(tiny_model), AutoTokenizer.from_pretrained(tiny_model)
    assert type(ours) is PreTrainedTokenizerFast
    for text in TEXTS:
        for special in (True, False):
            ids = auto(text, add_special_tokens=special)["input_ids"]
            assert ours(text, add_special_tokens=special)["input_ids"] == ids
    batch = [auto(t)["input_ids"] for t in TEXTS]
    for skip in (True, False):
        want = auto.batch_decode(batch, skip_special_tokens=skip)
        assert ours.batch_decode(batch, skip_special_tokens=skip) == want
    assert (ours.eos_token_id, ours.pad_token_id) == (auto.eos_token_id, auto.pad_token_id)
    assert ours.get_vocab() == auto.get_vocab()


def test_any_other_tokenizer_goes_through_auto_tokenizer(tiny_model, tmp_path):
    other = tmp_path / "model"
    shutil.copytree(tiny_model, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(
        json.dumps(config | {"tokenizer_class": "Qwen2Tokenizer"})
    )
    assert not generic_fast(str(other))
    assert type(load_tokenizer(str(other))).__name__ == "Qwen2Tokenizer"
    (other / "tokenizer.json").unlink()  # no fast tokenizer file: not generic fast either
    assert not generic_fast(str(other))
    assert not generic_fast("Qwen/Qwen2.5-0.5B-Instruct")  # a hub name
