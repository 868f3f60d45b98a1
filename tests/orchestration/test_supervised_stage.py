"""The supervised stages' config rules, placement and data drawing (no Ray)."""

import json
import re

import pytest

from orchestration.config import ConfigError, load_config
from orchestration.pipeline_data import pipeline_rows
from orchestration.resources import plan_placement
from orchestration.sampler import PromptSampler
from orchestration.specs import learner_spec

pytestmark = pytest.mark.unit  # pure code in this process


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["stage=sft", "sft.rows_per_step=15", "learner.num_ranks=2"],
            "sft.rows_per_step=15 does not split evenly into learner.num_ranks",
        ),
        (
            ["stage=rm", "rm.groups_per_step=3", "learner.num_mini_batches=2"],
            "rm.groups_per_step=3 does not split evenly",
        ),
        (["stage=rm", "ptx.coef=0.5"], "stage=rm: the ptx section is for stage=rl"),
        (["ptx.coef=0.5"], "ptx.coef > 0 needs ptx.source"),
        (["stage=rm", "rm.length_buckets=[1, 4]"], "give ascending edges from 0"),
        (["stage=sft", "learner.critic_init=/x"], "stage=sft trains no critic"),
        (
            ["stage=sft", "rrhf.dataset_responses=[a]", "data.source=x.jsonl"],
            "rrhf.dataset_responses is for stage=rrhf, not stage=sft",
        ),
        (
            ["stage=rrhf", "rrhf.dataset_responses=[a]"],
            "rrhf.dataset_responses: builtin:addition holds no responses",
        ),
    ],
)
def test_supervised_config_mistakes_are_named(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("demo", overrides)


def test_a_supervised_stage_places_the_learner_ranks_alone():
    cfg = load_config("demo", ["stage=sft", "learner.num_ranks=2"])
    plan = plan_placement(cfg)
    assert [g.name for g in plan.groups] == ["learners"] and len(plan.learners) == 2
    assert plan.generators == () and plan.reference is None and plan.reward == ()


def test_each_stage_gets_its_objective_and_rl_its_ptx_term(tmp_path):
    rows = tmp_path / "sft.jsonl"
    rows.write_text(json.dumps({"prompt": "1+1=", "response": "2"}) + "\n")
    sft = learner_spec(load_config("demo", ["stage=sft", "sft.packing=never"]), "m", 0)
    assert sft.objective.name == "next_token" and sft.objective.packing == "never"
    assert sft.critic_optim is None and sft.ptx is None
    rm = learner_spec(load_config("demo", ["stage=rm", "rm.reg=0.1"]), "m", 0)
    assert rm.objective.models == ("rm",) and rm.objective.reg == 0.1
    ppo = learner_spec(load_config("demo-ppo", [f"ptx.source={rows}", "ptx.coef=0.3"]), "m", 0)
    assert ppo.ptx.shares == {"actor/ptx_loss", "actor/ptx_accuracy"} and ppo.ptx_coef == 0.3
    assert ppo.critic_optim is not None


def test_the_sampler_draws_rows_of_any_sized_set_in_seeded_passes():
    sampler = PromptSampler(range(5), seed=3)
    ids, rows = sampler.next_rows(7)
    assert ids.tolist() == list(range(7))
    assert sorted(rows[:5].tolist()) == [0, 1, 2, 3, 4] and sampler.epoch == 1
    again = PromptSampler(range(5), seed=3)
    again.load_state_dict(sampler.state_dict())
    assert again.next_rows(4)[1].tolist() == sampler.next_rows(4)[1].tolist()


def test_pipeline_data_has_its_length_bias_and_equal_quality_pairs():
    data = pipeline_rows(max_operand=2, seed=0, biased_share=0.9)
    assert len(data["sft"]) == 9 and all(r["response"] for r in data["sft"])
    filler = [r for r in data["preferences"] if r["strength"] == "slightly better"]
    chosen_longer = sum(r["chosen"].count("=") > r["rejected"].count("=") for r in filler)
    assert chosen_longer / len(filler) > 0.75  # the deliberate bias: the chosen is the longer
    for r in data["equal_quality"]:
        assert r["chosen"].rstrip("=") == r["rejected"].rstrip("=") and r["chosen"] != r["rejected"]
