import subprocess
import sys

import pytest

from learner.algorithms import AdvantageEstimator
from learner.estimators import ESTIMATOR_SPECS
from orchestration import specs
from orchestration.config import ConfigError, load_config, parse_overrides, presets
from orchestration.specs import kl_kind, learner_spec, shaping_spec


@pytest.mark.unit
def test_presets_load_and_pick_their_algorithm():
    assert {"demo", "demo-ppo"} <= set(presets())
    grpo, ppo = load_config("demo"), load_config("demo-ppo")
    assert grpo.algorithm.estimator is AdvantageEstimator.GRPO
    assert ppo.algorithm.estimator is AdvantageEstimator.GAE
    # Decided once from the estimator: critic, where the KL goes, the aggregation.
    g, p = learner_spec(grpo, "m", 0, 10), learner_spec(ppo, "m", 0, 10)
    assert g.critic_optim is None and g.objective.loss.kl_loss_coef == grpo.algorithm.kl_coef
    assert g.objective.loss.agg == "seq-mean-token-mean" and kl_kind(grpo) == "k3"
    assert p.critic_optim is not None and p.objective.loss.kl_loss_coef == 0.0
    assert p.objective.loss.agg == "token-mean" and kl_kind(ppo) == "k1"


@pytest.mark.component  # a fresh interpreter
def test_importing_the_config_imports_no_torch():
    code = "import sys, orchestration.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


@pytest.mark.unit
@pytest.mark.parametrize("estimator", list(AdvantageEstimator))
def test_one_sample_per_prompt_is_refused_exactly_for_group_estimators(estimator):
    overrides = [f"algorithm.estimator={estimator.value}", "generator.samples_per_prompt=1"]
    if ESTIMATOR_SPECS[estimator].needs_groups:
        with pytest.raises(ConfigError, match="compares samples of one prompt"):
            load_config("demo", overrides)
    else:
        assert load_config("demo", overrides).generator.samples_per_prompt == 1


@pytest.mark.unit
def test_overrides_parse_as_yaml_and_win():
    cfg = load_config("demo", ["learner.lr=3e-4", "iterations=7", "algorithm.dual_clip=3"])
    assert cfg.learner.lr == 3e-4 and cfg.iterations == 7 and cfg.algorithm.dual_clip == 3.0
    assert parse_overrides(["a.b.c=[1, 2]", "x=null"]) == {"a": {"b": {"c": [1, 2]}}, "x": None}


@pytest.mark.unit
def test_config_is_frozen():
    cfg = load_config("demo")
    with pytest.raises(Exception, match="frozen"):
        cfg.learner.lr = 1.0


@pytest.mark.unit
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["learner.lrr=1e-3"], "learner.lrr: unknown key; did you mean 'lr'?"),
        (["learnr.lr=1e-3"], "learnr: unknown key; did you mean 'learner'?"),
        (["learner.lr=-1"], "learner.lr: Input should be greater than 0 (got -1)"),
        (["algorithm.estimator=ppo"], "algorithm.estimator: Input should be 'gae', 'grpo'"),
        (["generator.samples_per_prompt=1"], "set generator.samples_per_prompt to 2 or more"),
        (["learner.num_mini_batches=3"], "do not split evenly into learner.num_ranks"),
        (["generator.max_model_len=8"], "exceeds generator.max_model_len = 8; raise it"),
        (["model.path=/no/such/model"], "model.path: model path '/no/such/model' does not exist"),
        (["data.source=/no/such.jsonl"], "data.source: '/no/such.jsonl' does not exist"),
        (["learner.lr"], "override 'learner.lr' is not key=value"),
        (["learner.lr=[1"], "learner.lr: value '[1' is not valid YAML"),
        (["eval.source=/no/such"], "eval.source: '/no/such' does not exist"),
        (
            ["eval.source=builtin:addition", "eval.correct_component=rm"],
            "eval.correct_component='rm' is not a rule component (exact_integer)",
        ),
        (
            ["eval.source=builtin:addition", "eval.samples=4"],
            "eval.samples=4 with eval.temperature=0 repeats one greedy response",
        ),
        (["data.overlong=cut"], "data.overlong: Input should be 'skip', 'truncate' or 'error'"),
    ],
)
def test_bad_config_names_the_field_and_the_fix(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("demo", overrides)
    assert message in str(err.value)


@pytest.mark.unit
def test_wandb_turned_on_without_wandb_installed_is_refused_at_load(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ConfigError, match="logging.wandb.enabled: wandb is not installed; pip"):
        load_config("demo", ["logging.wandb.enabled=true"])


@pytest.mark.unit
def test_eval_needs_a_rule_function_to_score_with():
    with pytest.raises(ConfigError, match="eval scores samples with rule functions"):
        load_config("demo-rm", ["eval.source=builtin:addition", "reward.monitors=[]"])
    cfg = load_config("demo-rm", ["eval.source=builtin:addition"])
    assert cfg.eval_component == "exact_integer"  # the monitor


@pytest.mark.unit
def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as err:
        load_config("demo", ["learner.lr=0", "generator.temperature=0"])
    assert "learner.lr" in str(err.value) and "generator.temperature" in str(err.value)


@pytest.mark.unit
def test_critic_init_needs_an_estimator_that_trains_a_critic():
    with pytest.raises(ConfigError) as err:
        load_config("demo", ["learner.critic_init=/rm/helpful"])
    assert (
        "learner.critic_init='/rm/helpful' initialises a critic, but algorithm.estimator=grpo "
        "trains none; use algorithm.estimator=gae, or drop learner.critic_init"
    ) in str(err.value)
    spec = learner_spec(load_config("demo-ppo", ["learner.critic_init=/rm/helpful"]), "m", 0, 10)
    assert spec.critic_path == "/rm/helpful" and spec.model_path == "m"
    assert learner_spec(load_config("demo-ppo"), "m", 0, 10).critic_path is None  # the policy's


@pytest.mark.unit
def test_n_plus_ppo_details_reach_the_learner_and_the_shaper():
    cfg = load_config(
        "demo-ppo", ["learner.adam_eps=1e-5", "learner.lr_schedule=linear", "reward.whiten=true"]
    )
    spec = learner_spec(cfg, "m", 0, 10)
    for optim in (spec.policy_optim, spec.critic_optim):
        assert optim.eps == 1e-5 and optim.schedule == "linear"
    assert learner_spec(load_config("demo-ppo"), "m", 0, 10).policy_optim.eps == 1e-8
    assert shaping_spec(cfg).whiten and not shaping_spec(load_config("demo-ppo")).whiten
    with pytest.raises(ConfigError, match="learner.adam_eps: Input should be greater than 0"):
        load_config("demo", ["learner.adam_eps=0"])


@pytest.mark.unit
def test_unknown_config_source(tmp_path):
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config("no-such-preset")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(str(bad))


@pytest.mark.unit
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["reward.functions=[]"], "no reward: give reward.functions, reward.models or"),
        (
            ["reward.monitors=[{name: exact_integer}]"],
            "reward component names ['exact_integer'] are used twice",
        ),
        (
            ["reward.safety_gate={component: safety, threshold: 0.1}"],
            "reward.safety_gate.component='safety' is not a reward component (exact_integer)",
        ),
        (
            ["reward.remote=[{name: r, url: 'ftp://example.com/score'}]"],
            "reward.remote[r].url='ftp://example.com/score': give an http(s) URL",
        ),
        (
            ["reward.remote=[{name: r, url: 'https://evil.example/s', allowed_hosts: [rm.corp]}]"],
            "reward.remote[r].url host 'evil.example' is not in allowed_hosts ['rm.corp']",
        ),
        (
            ["reward.remote=[{name: r, url: 'https://a.b/s', batch_size: 5000}]"],
            "reward.remote.0.batch_size: Input should be less than or equal to 4096",
        ),
        (
            ["reward.models=[{name: rm, path: 'builtin:addition-rm'}]", "model.path=org/model"],
            "is trained on the built-in task with the built-in tokenizer",
        ),
        (
            [
                "reward.dynamic_sampling.enabled=true",
                "algorithm.estimator=gae",
                "generator.samples_per_prompt=1",
            ],
            "reward.dynamic_sampling drops groups with equal scores",
        ),
        (
            ["reward.overlong={buffer_tokens: 4}"],
            "reward.overlong.buffer_tokens=4 must be less than generator.max_new_tokens=4",
        ),
        (
            ["reward.models=[{name: rm, path: /no/such/rm}]"],
            "reward.models[rm].path: model path '/no/such/rm' does not exist",
        ),
        (
            ["reward.functions=[{name: regex_match}]"],
            "regex_match",
        ),
    ],
)
def test_reward_config_errors_name_the_field_and_the_fix(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config("demo", overrides)
    assert message in str(e.value)


@pytest.mark.unit
def test_reward_weights_cover_every_scored_component_but_not_monitors():
    cfg = load_config(
        "demo",
        [
            "reward.functions=[{name: exact_integer, weight: 0.5}]",
            "reward.models=[{name: rm, path: 'builtin:addition-rm', weight: 2}]",
            "reward.remote=[{name: judge, url: 'http://127.0.0.1:1/score'}]",
            "reward.monitors=[{name: length_in_range, column: short, params: {max_chars: 3}}]",
        ],
    )
    assert cfg.reward.weights == {"exact_integer": 0.5, "rm": 2.0, "judge": 1.0}


@pytest.mark.unit
def test_the_off_policy_correction_reaches_the_objective_and_is_checked():
    from learner.off_policy import OffPolicySpec
    from orchestration.specs import objective
    from rollout import schema as S

    cfg = load_config(
        "demo-ppo", ["algorithm.off_policy.weight=token", "algorithm.off_policy.cap=3"]
    )
    obj = objective(cfg)
    assert obj.loss.off_policy == OffPolicySpec(weight="token", cap=3.0)
    assert S.ROLLOUT_LOGPROBS in obj.columns  # PPO's objective reads vLLM's log-probabilities
    assert objective(load_config("demo-ppo")).loss.off_policy.enabled is False
    with pytest.raises(ConfigError, match="band"):
        load_config("demo", ["algorithm.off_policy.band=1"])


@pytest.mark.unit
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["max_staleness=1"], "max_staleness=1 trains on samples of older weights: set"),
        (
            ["max_staleness=1", "algorithm.off_policy.weight=token", "cluster.colocate=all"],
            "with cluster.colocate=all the generators sleep",
        ),
        (["max_staleness=1", "stage=sft"], "max_staleness=1 is for stage=rl, not stage=sft"),
    ],
)
def test_generation_ahead_needs_a_correction_and_devices_of_its_own(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", overrides)
    cfg = load_config("demo-async")
    assert cfg.max_staleness == 1 and cfg.partial_rollouts == "continue"
    assert specs.sampling(cfg).continue_across_updates
    finish = load_config("demo-async", ["partial_rollouts=finish"])
    assert not specs.sampling(finish).continue_across_updates
    assert not specs.sampling(load_config("demo")).continue_across_updates  # synchronous
    # Dynamic sampling takes its extra rounds from the generations running ahead.
    both = ["max_staleness=2", "algorithm.off_policy.mask=sequence"]
    assert load_config("demo", [*both, "reward.dynamic_sampling.enabled=true"]).max_staleness == 2
    with pytest.raises(ConfigError, match="partial_rollouts"):
        load_config("demo-async", ["partial_rollouts=later"])
