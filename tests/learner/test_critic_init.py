"""The critic's starting checkpoint: the policy's (fresh value head) or a reward model's (its
body and head), on the tiny model (CPU, no DeepSpeed)."""

import math
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Qwen2ForSequenceClassification,
)

from learner import models
from learner.models import VALUE_HEAD_FILE, CriticModel
from reward_service import reward_model
from reward_service.reward_model import RewardModel

pytestmark = pytest.mark.unit  # pure code in this process

HIDDEN = 128  # the tiny model's hidden size


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def known_head() -> dict[str, torch.Tensor]:
    return {
        "weight": torch.linspace(-1.0, 1.0, HIDDEN).reshape(1, HIDDEN),
        "bias": torch.tensor([0.25]),
    }


@pytest.fixture(scope="module")
def value_head_rm(tiny_model, tmp_path_factory) -> str:
    """The tiny causal LM with a known ``value_head.safetensors`` beside it."""
    path = tmp_path_factory.mktemp("critic_init") / "value_head"
    shutil.copytree(tiny_model, path)
    save_file(known_head(), str(path / VALUE_HEAD_FILE))
    return str(path)


def test_the_value_head_file_has_one_name_in_both_roles():
    assert models.VALUE_HEAD_FILE == reward_model.VALUE_HEAD_FILE


def test_a_value_head_reward_model_gives_the_critic_its_head_and_its_body(
    tiny_model, value_head_rm
):
    critic = CriticModel.from_pretrained(value_head_rm)
    head = known_head()
    assert torch.equal(critic.value_head.weight, head["weight"])
    assert torch.equal(critic.value_head.bias, head["bias"])
    assert_same_weights(critic.body, AutoModelForCausalLM.from_pretrained(tiny_model).get_decoder())


def test_the_critic_starts_where_the_reward_model_scores(tiny_model, value_head_rm):
    # The critic's value at the last token is the reward model's score of the sequence.
    ids = AutoTokenizer.from_pretrained(tiny_model)("1+2=3")["input_ids"]
    critic = CriticModel.from_pretrained(value_head_rm).eval()
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        values = critic(input_ids, torch.ones_like(input_ids), torch.arange(len(ids))[None])
    score = RewardModel(value_head_rm).score_ids([ids])[0]
    assert values[0, -1].item() == pytest.approx(score, abs=1e-5)


def test_without_a_value_head_file_the_head_is_fresh_with_zero_bias(tiny_model):
    torch.manual_seed(0)
    critic = CriticModel.from_pretrained(tiny_model)
    weight = critic.value_head.weight
    assert weight.shape == (1, HIDDEN) and torch.equal(critic.value_head.bias, torch.zeros(1))
    # N(0, 1/sqrt(d + 1)): 128 draws have a std within 25% of 0.088
    assert abs(weight.std().item() * math.sqrt(HIDDEN + 1) - 1.0) < 0.25
    assert_same_weights(critic.body, AutoModelForCausalLM.from_pretrained(tiny_model).get_decoder())


def test_a_classifier_reward_model_gives_its_body_and_score_head_with_zero_bias(
    tiny_model, tmp_path
):
    config = AutoConfig.from_pretrained(tiny_model)
    config.num_labels = 1
    torch.manual_seed(1)
    rm = Qwen2ForSequenceClassification(config)
    path = tmp_path / "classifier"
    rm.save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(path)
    assert rm.score.bias is None  # transformers' decoder classifiers have no bias
    critic = CriticModel.from_pretrained(str(path))
    assert torch.equal(critic.value_head.weight, rm.score.weight)
    assert torch.equal(critic.value_head.bias, torch.zeros(1))
    assert_same_weights(critic.body, rm.model)


def test_a_classifier_with_two_labels_is_refused(tiny_model, tmp_path):
    config = AutoConfig.from_pretrained(tiny_model)
    config.num_labels = 2
    path = tmp_path / "two"
    Qwen2ForSequenceClassification(config).save_pretrained(path, safe_serialization=True)
    with pytest.raises(ValueError, match="a sequence-classification head with 2 labels"):
        CriticModel.from_pretrained(str(path))


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (
            {"weight": torch.zeros(1, 64), "bias": torch.zeros(1)},
            r"its value head has weight \(1, 64\) and bias \(1,\); the body's hidden size 128 "
            r"needs weight \(1, 128\)",
        ),
        ({"weight": torch.zeros(1, HIDDEN)}, r"value_head.safetensors holds \['weight'\]"),
    ],
)
def test_a_value_head_that_does_not_fit_is_refused(tiny_model, tmp_path, head, message):
    path = tmp_path / "bad"
    shutil.copytree(tiny_model, path)
    save_file(head, str(path / VALUE_HEAD_FILE))
    with pytest.raises(ValueError, match=message):
        CriticModel.from_pretrained(str(path))
