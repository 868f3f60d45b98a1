import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from reward_service.reward_model import (
    VALUE_HEAD_FILE,
    RewardModel,
    RewardModelScorer,
    last_token_index,
    pad_batch,
    token_batches,
)
from rollout import GeneratedSample, build_rollout_table

pytestmark = pytest.mark.unit  # pure code in this process


@pytest.fixture(scope="module")
def seq_cls_rm(tiny_model, tmp_path_factory) -> str:
    """The tiny model's body with a random one-label head, as a sequence classifier."""
    path = tmp_path_factory.mktemp("rm") / "seqcls"
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    model.save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def value_head_rm(tiny_model, tmp_path_factory) -> str:
    """The tiny causal LM with ``value_head.safetensors`` beside it."""
    import shutil

    path = tmp_path_factory.mktemp("rm") / "valuehead"
    shutil.copytree(tiny_model, path)
    torch.manual_seed(2)
    save_file({"weight": torch.randn(1, 128), "bias": torch.tensor([0.5])}, path / VALUE_HEAD_FILE)
    return str(path)


def sequences(tiny_model) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(tiny_model)
    eos = tok.eos_token_id  # also the pad token: the case HF's own pooling gets wrong
    texts = ["1+2=3", "4+4=8", "2+3=", "0+0=0", "3"]
    return [tok(t)["input_ids"] + [eos] for t in texts[:4]] + [tok(texts[4])["input_ids"]]


def test_last_token_index_either_padding_side():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_token_id=0, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert last_token_index(mask).tolist() == [2, 0]
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_token_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert last_token_index(mask).tolist() == [2, 2]


def test_token_batches_respect_the_budget_and_cover_every_index():
    groups = token_batches([3, 10, 4, 2, 9], max_tokens=12)
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3, 4]
    lengths = [3, 10, 4, 2, 9]
    assert all(max(lengths[i] for i in g) * len(g) <= 12 or len(g) == 1 for g in groups)


@pytest.mark.parametrize("fixture", ["seq_cls_rm", "value_head_rm"])
def test_left_and_right_padding_give_the_unpadded_score(fixture, request, tiny_model):
    path = request.getfixturevalue(fixture)
    seqs = sequences(tiny_model)
    alone = [RewardModel(path).score_ids([s])[0] for s in seqs]  # no padding at all
    right = RewardModel(path, padding_side="right").score_ids(seqs)
    left = RewardModel(path, padding_side="left", micro_batch_tokens=16).score_ids(seqs)
    np.testing.assert_allclose(right, alone, atol=1e-5)
    np.testing.assert_allclose(left, alone, atol=1e-5)
    assert np.std(alone) > 1e-3  # the sequences really score differently


def test_score_is_read_at_the_last_real_token_not_the_first_pad(seq_cls_rm, tiny_model):
    seqs = sequences(tiny_model)
    rm = RewardModel(seq_cls_rm)
    # The head's output at the last position of each sequence, computed by hand.
    model = AutoModelForSequenceClassification.from_pretrained(seq_cls_rm)
    for seq, got in zip(seqs, rm.score_ids(seqs), strict=True):
        with torch.no_grad():
            hidden = model.base_model(input_ids=torch.tensor([seq])).last_hidden_state
            want = model.score(hidden[0, -1]).item()
        assert got == pytest.approx(want, abs=1e-5)


def test_scorer_uses_token_ids_with_the_same_vocabulary_and_text_agrees(seq_cls_rm, tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    eos = tok.eos_token_id
    prompt, responses = tok("1+2=")["input_ids"], ["3", "4", "12"]
    samples = [
        GeneratedSample(
            prompt_id=0,
            sample_index=i,
            prompt_token_ids=prompt,
            response_token_ids=tok(r)["input_ids"] + [eos],
            rollout_logprobs=[-1.0] * (len(tok(r)["input_ids"]) + 1),
            finish_reason="stop",
        )
        for i, r in enumerate(responses)
    ]
    table = build_rollout_table(samples, weight_version=0)
    scorer = RewardModelScorer("helpful", seq_cls_rm, tiny_model)
    assert scorer.same_vocab
    columns, metrics = scorer.score(table)
    assert columns.column_names == ["reward/helpful"]
    by_text = scorer.model.score_texts(["1+2="] * 3, responses, [True] * 3)
    np.testing.assert_allclose(columns["reward/helpful"].to_numpy(), by_text, atol=1e-5)
    assert metrics["reward/helpful/retokenized"] == 0


def test_a_multi_label_classifier_is_refused(tiny_model, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3)
    model.save_pretrained(tmp_path, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="3 labels"):
        RewardModel(str(tmp_path))


def test_a_plain_causal_lm_without_a_value_head_is_refused(tiny_model):
    with pytest.raises(ValueError, match=VALUE_HEAD_FILE):
        RewardModel(tiny_model)
