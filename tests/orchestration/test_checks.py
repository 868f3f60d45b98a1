"""The early input checks, each on a real tiny checkpoint built on disk (no hub)."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
)

from orchestration.checks import InputError, check_inputs
from orchestration.config import RunConfig
from reward_service.reward_model import VALUE_HEAD_FILE, RewardModel, RewardModelScorer
from rollout import GeneratedSample, build_rollout_table

pytestmark = pytest.mark.unit  # pure code in this process

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def run_config(max_model_len: int = 64, reward_models: tuple[str, ...] = ()) -> RunConfig:
    """A valid config: prompts and responses fit the tiny model's 128 positions."""
    return RunConfig.model_validate(
        {
            "data": {"max_prompt_tokens": 16},
            "generator": {"max_model_len": max_model_len, "max_new_tokens": 16},
            "reward": {"models": [{"name": n, "path": f"/rm/{n}"} for n in reward_models]},
        }
    )


def check(model_path, tokenizer=None, max_model_len=64, **reward_model_paths) -> list[str]:
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_path)
    cfg = run_config(max_model_len, tuple(reward_model_paths))
    return check_inputs(
        cfg, str(model_path), tokenizer, {k: str(v) for k, v in reward_model_paths.items()}
    )


def save_qwen2(path, tokenizer, cls=Qwen2ForCausalLM, vocab_size=None, **extra) -> str:
    """A random one-layer Qwen2 (``cls``) with ``tokenizer``, both saved at ``path``."""
    config = Qwen2Config(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )
    torch.manual_seed(0)
    cls(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


def pickled_copy(src, dst, cls=AutoModelForCausalLM) -> str:
    """``src`` with its weights as ``pytorch_model.bin`` only. (transformers 5 writes
    safetensors even with ``safe_serialization=False``, so the pickle is written directly.)"""
    model = cls.from_pretrained(src)
    dst.mkdir()
    model.config.save_pretrained(dst)
    torch.save(model.state_dict(), dst / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return str(dst)


@pytest.fixture(scope="module")
def policy_tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def same_vocab_rm(tiny_model, policy_tokenizer, tmp_path_factory) -> str:
    """A one-label classifier with the policy's tokenizer."""
    path = tmp_path_factory.mktemp("rm") / "same"
    return save_qwen2(path, policy_tokenizer, Qwen2ForSequenceClassification, num_labels=1)


@pytest.fixture(scope="module")
def other_vocab_rm(tmp_path_factory) -> str:
    """A one-label classifier whose byte-level BPE was trained on other text, with every byte
    in its alphabet (so it can spell the policy's text). Its EOS is ``<|endoftext|>``: for a
    qwen2 config AutoTokenizer loads a Qwen2Tokenizer, which adds that token when missing."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(["the sum of one and two is three", "12+34=46", "1+2=3"] * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    path = tmp_path_factory.mktemp("rm") / "other"
    return save_qwen2(path, tokenizer, Qwen2ForSequenceClassification, num_labels=1)


# ------------------------------------------------------------------------------ what passes


def test_the_tiny_model_with_a_same_vocabulary_rm_passes_without_notes(tiny_model, same_vocab_rm):
    assert check(tiny_model, helpful=same_vocab_rm) == []


def test_a_padded_embedding_larger_than_the_tokenizer_is_normal(policy_tokenizer, tmp_path):
    path = save_qwen2(tmp_path / "m", policy_tokenizer, vocab_size=64)  # tokenizer: 12 tokens
    assert len(policy_tokenizer) < 64
    assert check(path) == []


def test_a_value_head_rm_passes(tiny_model, tmp_path):
    path = tmp_path / "vh"
    shutil.copytree(tiny_model, path)
    save_file({"weight": torch.randn(1, 128), "bias": torch.zeros(1)}, path / VALUE_HEAD_FILE)
    assert check(tiny_model, vh=path) == []


# ------------------------------------------------------------------------------ files


def test_a_directory_without_config_json_points_at_the_model_inside(tiny_model, tmp_path):
    shutil.copytree(tiny_model, tmp_path / "run" / "policy")
    with pytest.raises(
        InputError,
        match=r"model.path '.*/run': a directory without config.json, so not a Hugging Face "
        r"model \(inside it, policy holds one\); give the directory that holds config.json",
    ):
        check(tmp_path / "run", AutoTokenizer.from_pretrained(tiny_model))


def test_pickled_weights_are_refused_and_the_suggested_conversion_passes(tiny_model, tmp_path):
    path = pickled_copy(tiny_model, tmp_path / "bin")
    message = (
        rf"model.path '{path}': the weights are pytorch_model.bin, not safetensors; Raylign "
        r"loads safetensors only .* Convert it once: AutoModelForCausalLM.from_pretrained\("
        rf"'{path}'\).save_pretrained\('{path}-safetensors', safe_serialization=True\) and "
        rf"AutoTokenizer.from_pretrained\('{path}'\).save_pretrained\('{path}-safetensors'\)"
    )
    with pytest.raises(InputError, match=message):
        check(path)
    # The conversion the message gives, as written.
    out = f"{path}-safetensors"
    AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)
    assert check(out) == []


def test_a_directory_with_a_config_but_no_weights(tiny_model, tmp_path):
    path = tmp_path / "empty"
    shutil.copytree(tiny_model, path, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(InputError, match=r"model.path '.*': config.json but no weights"):
        check(path)


def test_trainer_state_beside_missing_weights_is_not_taken_for_weights(tiny_model, tmp_path):
    path = tmp_path / "trainer"
    shutil.copytree(tiny_model, path, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save({"lr": 1.0}, path / "optimizer.pt")
    with pytest.raises(InputError, match="config.json but no weights"):
        check(path)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("lfs", r"model.safetensors is a Git LFS pointer, not the weights; fetch them"),
        ("truncated", r"model.safetensors is not a whole safetensors file \(.*incomplete"),
    ],
)
def test_a_weight_file_that_is_not_whole_is_named(tiny_model, tmp_path, damage, message):
    path = tmp_path / damage
    shutil.copytree(tiny_model, path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    if damage == "lfs":
        data = b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n"
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else data)
    with pytest.raises(InputError, match=r"model.path: .*" + message):
        check(path)


def test_a_missing_shard_is_named(tiny_model, tmp_path):
    path = tmp_path / "sharded"
    shutil.copytree(tiny_model, path)
    (path / "model.safetensors").rename(path / "model-00001-of-00002.safetensors")
    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        InputError,
        match=r"model.safetensors.index.json lists 2 shards, but model-00002-of-00002.safetensors "
        r"is missing; copy or download the whole checkpoint",
    ):
        check(path)


def test_a_model_without_tokenizer_files(tiny_model, tmp_path):
    path = tmp_path / "notok"
    shutil.copytree(tiny_model, path, ignore=shutil.ignore_patterns(*TOKENIZER_FILES))
    with pytest.raises(
        InputError,
        match=r"model.path '.*notok': no tokenizer files .*transformers would build an empty",
    ):
        check(path, AutoTokenizer.from_pretrained(tiny_model))


@pytest.mark.parametrize(
    "config, message",
    [
        (
            {"model_type": "raylign_custom", "auto_map": {"AutoConfig": "custom.Config"}},
            r"cannot read its config \(.*\); it ships its own Python: set "
            r"model.trust_remote_code=true if you trust it",
        ),
        ("{not json", r"cannot read its config \(.*not a valid JSON file"),
    ],
)
def test_an_unreadable_config_is_named(tiny_model, tmp_path, config, message):
    path = tmp_path / "custom"
    shutil.copytree(tiny_model, path)
    text = config if isinstance(config, str) else json.dumps(config)
    (path / "config.json").write_text(text)
    with pytest.raises(InputError, match=r"model.path '.*custom': " + message):
        check(path, AutoTokenizer.from_pretrained(tiny_model))


# ------------------------------------------------------------------------------ policy


def test_a_tokenizer_larger_than_the_embedding(policy_tokenizer, tmp_path):
    path = save_qwen2(tmp_path / "small", policy_tokenizer, vocab_size=8)
    assert len(policy_tokenizer) == 12
    with pytest.raises(
        InputError,
        match=rf"model.path '{path}': the tokenizer at '{path}' has 12 tokens, but the model's "
        r"embedding holds vocab_size=8 \(config.json\): ids 8 to 11 have no embedding. Give "
        r"the tokenizer the model was trained with, or resize the model "
        r"\(model.resize_token_embeddings\(12\)\)",
    ):
        check(path)


def test_a_special_token_id_past_the_embedding(tiny_model, tmp_path):
    # EOS moved to id 50: the tokenizer still has 12 tokens, the embedding 12 rows.
    path = tmp_path / "gap"
    shutil.copytree(tiny_model, path)
    spec = json.loads((path / "tokenizer.json").read_text())
    spec["added_tokens"][0]["id"] = spec["model"]["vocab"]["<|endoftext|>"] = 50
    (path / "tokenizer.json").write_text(json.dumps(spec))
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert len(tokenizer) == 12 and tokenizer.eos_token_id == 50
    with pytest.raises(
        InputError,
        match=r"has eos_token_id=50, but the model's embedding holds vocab_size=12 \(ids 0 to "
        r"11\); set eos_token in its tokenizer_config.json to a token the model knows",
    ):
        check(path, tokenizer)


def test_a_tokenizer_without_eos(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.eos_token = None
    with pytest.raises(
        InputError,
        match=r"the tokenizer has no EOS token, so a response can only end at "
        r"generator.max_new_tokens",
    ):
        check(tiny_model, tokenizer)


def test_a_classifier_given_as_the_policy(same_vocab_rm):
    with pytest.raises(
        InputError,
        match=r"model.path '.*': a Qwen2ForSequenceClassification checkpoint \(a classifier, "
        r"such as a reward model\), not a causal LM",
    ):
        check(same_vocab_rm)


def test_max_model_len_past_the_position_embeddings(tiny_model, tmp_path):
    with pytest.raises(
        InputError,
        match=r"generator.max_model_len=256 is longer than the policy's "
        r"max_position_embeddings=128 .* set generator.max_model_len to at most 128",
    ):
        check(tiny_model, max_model_len=256)
    assert check(tiny_model, max_model_len=128) == []
    # Scaled RoPE: vLLM derives the longer limit itself; nothing to say here.
    path = tmp_path / "scaled"
    shutil.copytree(tiny_model, path)
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    (path / "config.json").write_text(json.dumps(config))
    assert check(path, max_model_len=256) == []
    # A separate model_max_length in config.json: vLLM accepts lengths up to it.
    del config["rope_parameters"]
    config["model_max_length"] = 512
    (path / "config.json").write_text(json.dumps(config))
    assert check(path, max_model_len=256) == []


# ------------------------------------------------------------------------------ reward models


def test_a_reward_model_with_another_vocabulary_gets_a_note(tiny_model, other_vocab_rm):
    rm_tokenizer = AutoTokenizer.from_pretrained(other_vocab_rm)
    assert len(rm_tokenizer) > 256  # every byte, plus merges
    assert check(tiny_model, helpful=other_vocab_rm) == [
        f"reward model helpful: its tokenizer differs from the policy's (12 and "
        f"{len(rm_tokenizer)} tokens); responses are decoded to text and re-tokenized for it "
        "(counted in reward/helpful/retokenized)"
    ]


def test_a_reward_model_with_another_vocabulary_scores_text_as_given_directly(
    tiny_model, policy_tokenizer, other_vocab_rm
):
    tok, eos = policy_tokenizer, policy_tokenizer.eos_token_id
    prompt = tok("1+2=")["input_ids"]
    responses = [("3", "stop"), ("12", "stop"), ("4", "length")]
    samples = []
    for i, (text, finish) in enumerate(responses):
        ids = tok(text)["input_ids"] + ([eos] if finish == "stop" else [])
        samples.append(
            GeneratedSample(
                prompt_id=0,
                sample_index=i,
                prompt_token_ids=prompt,
                response_token_ids=ids,
                rollout_logprobs=[-1.0] * len(ids),
                finish_reason=finish,
            )
        )
    scorer = RewardModelScorer("helpful", other_vocab_rm, tiny_model)
    assert not scorer.same_vocab
    columns, metrics = scorer.score(build_rollout_table(samples, weight_version=0))
    direct = RewardModel(other_vocab_rm).score_texts(
        ["1+2="] * 3, [t for t, _ in responses], [f == "stop" for _, f in responses]
    )
    np.testing.assert_allclose(columns["reward/helpful"].to_numpy(), direct, atol=1e-5)
    assert np.std(direct) > 1e-4  # the three texts really score differently
    assert metrics["reward/helpful/retokenized"] == 3


def test_a_reward_model_tokenizer_larger_than_its_embedding(policy_tokenizer, tiny_model, tmp_path):
    path = save_qwen2(
        tmp_path / "rm",
        policy_tokenizer,
        Qwen2ForSequenceClassification,
        vocab_size=8,
        num_labels=1,
    )
    with pytest.raises(
        InputError,
        match=rf"reward.models\[helpful\].path '{path}': the tokenizer at '{path}' has 12 "
        r"tokens, but the model's embedding holds vocab_size=8",
    ):
        check(tiny_model, helpful=path)


def test_a_reward_model_with_pickled_weights(tiny_model, same_vocab_rm, tmp_path):
    path = pickled_copy(same_vocab_rm, tmp_path / "rm-bin", AutoModelForSequenceClassification)
    with pytest.raises(
        InputError,
        match=rf"reward.models\[helpful\].path '{path}': the weights are pytorch_model.bin, not "
        r"safetensors; .* AutoModelForSequenceClassification.from_pretrained",
    ):
        check(tiny_model, helpful=path)


def test_a_value_head_is_not_taken_for_pickled_lm_weights(tiny_model, tmp_path):
    path = tmp_path / "vh-bin"
    pickled_copy(tiny_model, path)
    save_file({"weight": torch.randn(1, 128), "bias": torch.zeros(1)}, path / VALUE_HEAD_FILE)
    with pytest.raises(
        InputError, match=rf"not safetensors; .*, and copy {re.escape(VALUE_HEAD_FILE)}"
    ):
        check(tiny_model, vh=path)


def test_a_reward_model_the_scorer_cannot_read(tiny_model):
    with pytest.raises(
        InputError,
        match=rf"reward.models\[helpful\].path: reward model .*: neither a "
        rf"\*ForSequenceClassification checkpoint nor a causal LM with {VALUE_HEAD_FILE}",
    ):
        check(tiny_model, helpful=tiny_model)


# ------------------------------------------------------------------------------ critic init


def check_critic(policy, critic_init) -> list[str]:
    cfg = RunConfig.model_validate(
        {
            "data": {"max_prompt_tokens": 16},
            "generator": {"max_model_len": 64, "max_new_tokens": 16},
            "algorithm": {"estimator": "gae"},
            "learner": {"critic_init": str(critic_init)},
        }
    )
    return check_inputs(cfg, policy, AutoTokenizer.from_pretrained(policy), {})


def test_a_value_head_or_classifier_reward_model_passes_as_critic_init(
    tiny_model, same_vocab_rm, tmp_path
):
    path = tmp_path / "vh"
    shutil.copytree(tiny_model, path)
    save_file({"weight": torch.randn(1, 128), "bias": torch.zeros(1)}, path / VALUE_HEAD_FILE)
    assert check_critic(tiny_model, path) == []
    assert check_critic(tiny_model, same_vocab_rm) == []


def test_a_causal_lm_without_a_value_head_as_critic_init_gets_a_note(tiny_model):
    assert check_critic(tiny_model, tiny_model) == [
        f"learner.critic_init {tiny_model!r} is a causal LM without {VALUE_HEAD_FILE}: the "
        "critic starts from its body with a fresh value head"
    ]


def test_a_value_head_that_does_not_fit_the_body_is_refused_as_critic_init(tiny_model, tmp_path):
    path = tmp_path / "vh64"
    shutil.copytree(tiny_model, path)
    save_file({"weight": torch.randn(1, 64), "bias": torch.zeros(1)}, path / VALUE_HEAD_FILE)
    with pytest.raises(
        InputError,
        match=r"learner.critic_init: .*value_head.safetensors holds \{'bias': \(1,\), "
        r"'weight': \(1, 64\)\}; a value head for this body \(hidden size 128\) is exactly "
        r"\{'bias': \(1,\), 'weight': \(1, 128\)\}",
    ):
        check_critic(tiny_model, path)


def test_a_critic_init_with_another_vocabulary_is_refused(tiny_model, other_vocab_rm):
    with pytest.raises(
        InputError,
        match=r"learner.critic_init '.*other': its tokenizer differs from the policy's \(12 and "
        r"\d+ tokens, or other ids\); the critic reads the policy's token ids",
    ):
        check_critic(tiny_model, other_vocab_rm)


def test_a_critic_init_that_is_no_directory_or_a_two_label_classifier(
    tiny_model, policy_tokenizer, tmp_path
):
    with pytest.raises(
        InputError,
        match=r"learner.critic_init '/no/such/rm' is not a directory; give a reward model's "
        r"directory: a causal LM with value_head.safetensors, or a one-label",
    ):
        check_critic(tiny_model, "/no/such/rm")
    path = save_qwen2(
        tmp_path / "two", policy_tokenizer, Qwen2ForSequenceClassification, num_labels=2
    )
    with pytest.raises(InputError, match=r"learner.critic_init: .* with 2 labels"):
        check_critic(tiny_model, path)
