"""The placement plan (which bundle each actor takes) and the fit check's messages."""

from __future__ import annotations

import pytest

from orchestration.config import ConfigError, load_config
from orchestration.resources import check_fit, plan_placement

pytestmark = pytest.mark.unit  # pure code in this process

GPU = [
    "cluster.generator.num_gpus=1",
    "cluster.learner.num_gpus=1",
    "cluster.reference.num_gpus=1",
]


def node(cpus: float, gpus: float = 0, **custom: float) -> dict[str, float]:
    return {"CPU": cpus, "GPU": gpus, **custom}


def test_one_group_per_role_with_a_bundle_per_worker_and_rank():
    cfg = load_config(
        "demo",
        [
            *GPU,
            "generator.num_replicas=2",
            "generator.tensor_parallel_size=2",
            "learner.num_ranks=4",
            "cluster.learner.strategy=SPREAD",
        ],
    )
    plan = plan_placement(cfg)
    groups = {g.name: g for g in plan.groups}
    assert set(groups) == {"generators", "learners", "reference", "reward"}
    assert len(groups["generators"].bundles) == 4  # 2 replicas x 2 tensor-parallel workers
    assert plan.generator_bundles == ((0, 1), (2, 3))
    # with tensor parallelism vLLM's workers hold the GPUs; the replica's actor holds none
    assert [(s.bundle, s.num_gpus) for s in plan.generators] == [(0, 0.0), (2, 0.0)]
    assert [s.bundle for s in plan.learners] == [0, 1, 2, 3]
    assert groups["learners"].strategy == "SPREAD"
    assert plan.totals()["GPU"] == 4 + 4 + 1


def test_colocating_the_reference_adds_it_to_learner_rank_0s_bundle():
    cfg = load_config(
        "demo",
        [
            "cluster.learner.num_gpus=0.5",
            "cluster.reference.num_gpus=0.5",
            "cluster.colocate=learner_reference",
            "weight_sync.method=object_store",
            "learner.num_ranks=2",
        ],
    )
    plan = plan_placement(cfg)
    learners = next(g for g in plan.groups if g.name == "learners")
    assert learners.bundles[0]["GPU"] == 1.0 and learners.bundles[1]["GPU"] == 0.5
    assert (plan.reference.group, plan.reference.bundle) == ("learners", 0)
    assert "reference" not in {g.name for g in plan.groups}


def test_full_colocation_shares_bundle_i_between_generator_i_and_learner_rank_i():
    cfg = load_config(
        "demo",
        [
            "cluster.generator.num_gpus=0.4",
            "cluster.learner.num_gpus=0.4",
            "cluster.reference.num_gpus=0.2",
            "cluster.colocate=all",
            "generator.num_replicas=2",
            "learner.num_ranks=2",
        ],
    )
    plan = plan_placement(cfg)
    assert [g.name for g in plan.groups] == ["colocated", "reward"]
    bundles = plan.groups[0].bundles
    assert bundles[0]["GPU"] == pytest.approx(1.0) and bundles[1]["GPU"] == pytest.approx(0.8)
    assert [s.bundle for s in plan.generators] == [0, 1] == [s.bundle for s in plan.learners]


def test_a_cluster_short_of_gpus_is_told_the_sum():
    cfg = load_config(
        "demo",
        [
            *GPU,
            "cluster.generator.num_gpus=1",
            "generator.num_replicas=4",
            "generator.tensor_parallel_size=2",
            "learner.num_ranks=8",
            "cluster.reference.num_gpus=0",
        ],
    )
    problems = check_fit(plan_placement(cfg), [node(64, 8), node(64, 4)])
    assert problems == [
        "8 learner ranks x 1 GPU + 4 generators x 2 GPUs need 16 GPUs; the cluster has 12"
    ]


def test_a_bundle_larger_than_any_node_is_named_even_when_the_total_fits():
    cfg = load_config("demo", ["cluster.learner.num_cpus=3", "learner.num_ranks=2"])
    problems = check_fit(plan_placement(cfg), [node(2), node(2), node(2), node(2)])
    assert len(problems) == 2
    assert all("placement group 'learners' needs {'CPU': 3.0}" in p for p in problems)


def test_custom_resources_count_like_any_other():
    cfg = load_config("demo", ["cluster.learner.resources={learner_node: 1}"])
    assert check_fit(plan_placement(cfg), [node(8, learner_node=1)]) == []
    assert check_fit(plan_placement(cfg), [node(8)]) == [
        "1 learner rank x 1 learner_node need 1 learner_node; the cluster has 0"
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["cluster.colocate=all", "generator.num_replicas=2"],
            "generator.num_replicas x generator.tensor_parallel_size = 2 and learner.num_ranks = 1",
        ),
        (["generator.tensor_parallel_size=2"], "tensor_parallel_size > 1 needs GPUs"),
        (["weight_sync.method=cuda_ipc"], "cuda_ipc maps the learner's GPU buffers"),
        (["cluster.learner.num_gpus=1"], "same kind of device"),
        (
            ["learner.num_ranks=3"],
            "256 samples do not split evenly into learner.num_ranks x learner.num_mini_batches",
        ),
    ],
)
def test_scale_settings_that_cannot_work_are_refused_with_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("demo", overrides)


def test_each_reward_actor_has_a_bundle_and_a_reward_model_may_bring_its_own_resources():
    cfg = load_config(
        "demo",
        [
            *GPU,
            "reward.models=[{name: helpful, path: 'builtin:addition-rm', "
            "resources: {num_cpus: 1, num_gpus: 1}}, {name: safety, path: 'builtin:addition-rm'}]",
            "reward.remote=[{name: judge, url: 'http://127.0.0.1:1/score'}]",
        ],
    )
    plan = plan_placement(cfg)
    (reward,) = [g for g in plan.groups if g.name == "reward"]
    # rules, helpful (its own GPU), safety and judge (cluster.reward's 0.25 CPU each)
    assert reward.bundles == ({"CPU": 0.25}, {"CPU": 1, "GPU": 1}, {"CPU": 0.25}, {"CPU": 0.25})
    assert [(s.bundle, s.num_gpus) for s in plan.reward] == [(0, 0), (1, 1), (2, 0), (3, 0)]
    # 3 GPUs for generator, learner, reference + 1 for the reward model.
    (problem,) = check_fit(plan, [node(8, 3)])
    assert problem == (
        "1 learner rank x 1 GPU + 1 generator x 1 GPU + 1 reference x 1 GPU + "
        "1 reward scorer (helpful) x 1 GPU need 4 GPUs; the cluster has 3"
    )


@pytest.mark.parametrize("colocate", ["none", "learner_reference", "all"])
def test_rrhf_and_rs_start_no_reference_and_online_dpo_does(colocate):
    gpus = ["cluster.learner.num_gpus=0.5", "cluster.reference.num_gpus=0.5"]
    gpus += ["cluster.generator.num_gpus=0.5", f"cluster.colocate={colocate}"]
    gpus += ["weight_sync.method=object_store"]
    total = {}
    for preset, has in (("demo-rrhf", False), ("demo-rs", False), ("demo-dpo", True)):
        plan = plan_placement(load_config(preset, gpus))
        assert (plan.reference is not None) == has, preset
        assert ("reference" in {d.noun for d in plan.demands}) == has, preset
        total[preset] = sum(b.get("GPU", 0.0) for g in plan.groups for b in g.bundles)
    assert total["demo-dpo"] - total["demo-rs"] == total["demo-dpo"] - total["demo-rrhf"] == 0.5
