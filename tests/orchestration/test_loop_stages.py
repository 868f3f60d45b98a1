"""The loop's stage order and the data it hands between stages, driven with stand-in stages on
CPU (no Ray, no vLLM, no DeepSpeed); and the advantages stage as a pure function."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch

from orchestration.advantages import Advantages, AdvantageSpec, advantages
from orchestration.config import load_config
from orchestration.loop import Loop
from orchestration.stages import Trained
from rollout import schema as S
from tests.orchestration.helpers import grpo_spec, scored_rollout

pytestmark = pytest.mark.unit  # pure code in this process


class StandInSampler:
    progress = 0.25

    def next_batch(self, n: int) -> str:
        return f"prompts[{n}]"


class StandInStages:
    """Records each stage call with what it was given; returns a token naming its output."""

    actors = SimpleNamespace(learners=[])

    def __init__(self, *, rounds_needed: int = 1, kl_ref: float = 0.0, skipped: int = 0):
        self.calls: list[tuple] = []
        self.rounds_needed, self.kl_ref, self.skipped = rounds_needed, kl_ref, skipped
        self.pool = SimpleNamespace(version=0, requests=0)
        self.faults = SimpleNamespace(metrics={"faults/generator_recoveries": 0.0})
        self.rewards = SimpleNamespace(describe_unscorable=lambda: "")

    def generate(self, prompts):
        self.calls.append(("generate", prompts))
        return "generated"

    def reward(self, generated):
        self.calls.append(("reward", generated))
        return "scored"

    def enough(self, rounds, wanted):
        self.calls.append(("enough", len(rounds), wanted))
        return len(rounds) >= self.rounds_needed

    def sleep(self):
        self.calls.append(("sleep",))

    def select(self, rounds, wanted):
        self.calls.append(("select", len(rounds), wanted))
        return "batch", {"reward/rounds": float(len(rounds))}

    early_passes = False

    @property
    def dynamic(self):
        return self.rounds_needed > 1

    def start_passes(self, table):
        self.calls.append(("start_passes", table))
        return "passes"

    def finish_passes(self, passes, scored):
        self.calls.append(("finish_passes", passes, scored))
        return pa.table({"x": [1, 2, 3, 4]}), {"timing/reference": 0.25}

    def advantages(self, table, kl_coef):
        self.calls.append(("advantages", table.num_rows, kl_coef))
        metrics = {
            "rollout/samples": 4.0,
            "rollout/prompt_tokens": 8.0,
            "rollout/response_tokens": 8.0,
            "rollout/logprob_mismatch": 0.0,
            "reward/unscorable_fraction": 0.0,
        }
        return Advantages(table=table, metrics=metrics, kl_ref=self.kl_ref)

    def train(self, table, settings, ptx=None):
        self.calls.append(("train", table.num_rows, dict(settings)))
        assert ptx is None  # no ptx section: no PTX rows
        return Trained(metrics={"actor/pg_loss": 0.5}, skipped_in_a_row=self.skipped)

    def sync_weights(self, wait=True):
        self.calls.append(("sync",))
        self.pool.version += 1
        return {"sync/bytes": 10.0}


def loop_over(stages, *overrides: str) -> Loop:
    cfg = load_config("demo", ["data.prompts_per_iteration=2", *overrides])
    return Loop(cfg, stages, StandInSampler(), run_dir=None)


def test_one_iteration_runs_the_stages_in_order_and_hands_each_its_input():
    stages = StandInStages()
    metrics = loop_over(stages).iteration()
    assert [c[0] for c in stages.calls] == [
        "generate",
        "reward",
        "enough",
        "sleep",
        "select",
        "start_passes",
        "finish_passes",
        "advantages",
        "train",
        "sync",
    ]
    assert stages.calls[0] == ("generate", "prompts[2]")
    assert stages.calls[5] == ("start_passes", "generated")  # not waiting for the scores
    assert stages.calls[6] == ("finish_passes", "passes", "batch")
    assert metrics["sync/bytes"] == 10.0 and metrics["actor/pg_loss"] == 0.5
    assert metrics["reward/rounds"] == 1.0 and "faults/generator_recoveries" in metrics
    assert metrics["perf/samples_per_s"] > 0
    assert {f"timing/{s}" for s in ("generate", "train", "sync", "iteration")} <= set(metrics)
    assert metrics["timing/reference"] == 0.25  # the passes' own timings are reported
    assert stages.pool.version == 1


def test_a_final_batch_is_scored_by_the_passes_while_it_is_rewarded():
    stages = StandInStages()
    stages.early_passes = True
    loop_over(stages).iteration()
    names = [c[0] for c in stages.calls]
    assert names[:3] == ["generate", "start_passes", "reward"]
    assert stages.calls[1] == ("start_passes", "generated")
    assert ("finish_passes", "passes", "batch") in stages.calls
    assert names.count("start_passes") == 1


def test_dynamic_sampling_generates_and_rewards_until_the_stage_says_enough():
    stages = StandInStages(rounds_needed=3)
    loop_over(stages).iteration()
    names = [c[0] for c in stages.calls]
    assert names[:9] == ["generate", "reward", "enough"] * 3
    assert ("select", 3, 2) in stages.calls
    assert ("start_passes", "batch") in stages.calls  # the selected groups, not a round


def test_the_loss_gets_the_kl_controllers_current_coefficient():
    """With a KL-in-loss estimator (GRPO) and ``algorithm.kl_target``, the adaptive controller
    moves the coefficient; the train stage must be given the value it moved to (the one logged as
    ``actor/kl_coef``), not the starting one."""
    stages = StandInStages(kl_ref=1.0)  # far above the target: the coefficient rises
    loop = loop_over(stages, "algorithm.kl_coef=0.01", "algorithm.kl_target=0.01")
    first = loop.iteration()
    second = loop.iteration()
    (_, _, kl_given_1), (_, _, kl_given_2) = [c for c in stages.calls if c[0] == "advantages"]
    (_, _, settings_1), (_, _, settings_2) = [c for c in stages.calls if c[0] == "train"]
    assert kl_given_1 == 0.01  # the token rewards of iteration 0 use the starting value
    assert settings_1["kl_coef"] == first["actor/kl_coef"] > 0.01
    assert settings_2["kl_coef"] == second["actor/kl_coef"] > settings_1["kl_coef"]
    assert kl_given_2 == settings_1["kl_coef"]


def test_a_numerical_fault_comes_from_the_train_stage_not_a_metric(tmp_path):
    from orchestration.guards import NumericalFault
    from orchestration.metrics import MetricsLog

    stages = StandInStages(skipped=8)
    loop = loop_over(stages, "learner.max_skipped_in_a_row=8", f"logging.root={tmp_path}")
    loop.run_dir = tmp_path
    loop.save_checkpoint = lambda k: tmp_path / "ckpt"
    log = MetricsLog(tmp_path, 20, progress_bar=False)
    with pytest.raises(NumericalFault, match=r"8 updates in a row .*\(checkpoint: .*ckpt\)"):
        loop.run(log)
    log.close()
    assert "learner/skipped_in_a_row" not in log.history[0]  # no metric carried the count


# ------------------------------------------------------------------------------ advantages


def test_grpo_advantages_are_each_groups_normalised_scores_on_every_token():
    table = scored_rollout([1.0, 0.0, 0.5, 0.5, 2.0, None])  # groups {0,1}, {2,3}, {4,5}
    out = advantages(table, grpo_spec(), kl_coef=0.1, version=3)
    adv = out.table["advantages"].to_pylist()
    assert [len(a) for a in adv] == [1, 2, 3, 1, 2, 3]
    assert all(len(set(a)) == 1 for a in adv)  # one value per response
    a = [row[0] for row in adv]
    assert a[0] > 0 > a[1] and a[0] == pytest.approx(-a[1])  # above / below the group mean
    assert a[2] == a[3] == 0.0  # equal scores teach nothing
    assert out.metrics["reward/zero_spread_groups"] == pytest.approx(1 / 2)  # {4,5}: one score
    assert out.metrics["reward/unscorable_fraction"] == pytest.approx(1 / 6)
    assert out.metrics["reward/score_mean"] == pytest.approx(4.0 / 5)
    old = torch.tensor([-1.0 - 0.1 * t for n in [1, 2, 3, 1, 2, 3] for t in range(n)])
    assert out.kl_ref == pytest.approx(float((old + 1.5).mean()), rel=1e-6)
    assert out.metrics["rollout/weight_version"] == 3.0
    assert out.metrics["rollout/logprob_mismatch"] == pytest.approx(float((old + 1.0).abs().mean()))


def test_a_kl_in_the_reward_takes_the_coefficient_given():
    table = scored_rollout([1.0, 0.0, 0.5, 0.5])
    spec = AdvantageSpec(
        estimator="reinforce_pp", kl_in_reward=True, needs_critic=False, kl_kind="k1"
    )
    low = advantages(table, spec, kl_coef=0.0, version=3).table["returns"].to_pylist()
    high = advantages(table, spec, kl_coef=1.0, version=3).table["returns"].to_pylist()
    # k1 KL old - ref > 0 on every token: a larger coefficient lowers every return
    assert all(
        h < lo for hr, lr in zip(high, low, strict=True) for h, lo in zip(hr, lr, strict=True)
    )


def test_a_rollout_from_other_weights_is_refused():
    with pytest.raises(
        RuntimeError, match=r"weight versions \[3\]; training version 4 takes only 4"
    ):
        advantages(scored_rollout([1.0, 0.0]), grpo_spec(), kl_coef=0.0, version=4)
    assert math.isfinite(advantages(scored_rollout([1.0, 0.0]), grpo_spec(), 0.0, 3).kl_ref)


def test_the_staleness_bound_takes_rows_up_to_k_versions_behind_and_counts_them():
    table = scored_rollout([1.0, 0.0, 0.5, 0.5])  # every row from version 3
    at = table.column_names.index(S.WEIGHT_VERSION)
    table = table.set_column(at, S.WEIGHT_VERSION, pa.array([3, 3, 4, 5], pa.int64()))
    spec = dataclasses.replace(grpo_spec(), max_staleness=2)
    got = advantages(table, spec, kl_coef=0.0, version=5).metrics
    assert got["rollout/staleness_mean"] == pytest.approx((2 + 2 + 1 + 0) / 4)
    assert got["rollout/staleness_max"] == 2.0
    assert [got[f"rollout/staleness_{s}"] for s in range(3)] == [0.25, 0.25, 0.5]
    with pytest.raises(RuntimeError, match=r"takes only 4..5 \(max_staleness=1\)"):
        advantages(table, dataclasses.replace(spec, max_staleness=1), 0.0, version=5)
    with pytest.raises(RuntimeError, match="training version 4"):  # a row from the future
        advantages(table, spec, 0.0, version=4)
    assert (
        "rollout/staleness_mean"
        not in advantages(scored_rollout([1.0, 0.0]), grpo_spec(), 0.0, 3).metrics
    )


def test_partial_rollouts_count_rows_continued_across_an_update_and_token_staleness():
    # Rows of 1, 2, 3 and 1 tokens; rows 1 and 2 were reached by an update mid-way.
    table = scored_rollout([1.0, 0.0, 0.5, 0.5])
    at = table.column_names.index(S.WEIGHT_VERSION)
    table = table.set_column(at, S.WEIGHT_VERSION, pa.array([3, 3, 4, 5], pa.int64()))
    versions = pa.array([[3], [3, 4], [4, 5, 5], [5]], pa.list_(pa.int64()))
    table = table.append_column(S.KNOWN_FIELDS[S.TOKEN_VERSIONS], versions)
    spec = dataclasses.replace(grpo_spec(), max_staleness=2)
    got = advantages(table, spec, kl_coef=0.0, version=5).metrics
    # The bound and the histogram count a row from its first token: (2 + 2 + 1 + 0) / 4.
    assert got["rollout/staleness_mean"] == pytest.approx(1.25)
    assert got["rollout/partial_fraction"] == 0.5
    # Tokens behind version 5: 2 | 2, 1 | 1, 0, 0 | 0 -> 6 over 7 tokens.
    assert got["rollout/token_staleness_mean"] == pytest.approx(6 / 7)
    assert (
        "rollout/partial_fraction"
        not in advantages(table.drop([S.TOKEN_VERSIONS]), spec, 0.0, 5).metrics
    )
