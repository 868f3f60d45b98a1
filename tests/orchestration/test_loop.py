"""The loop's rollback policy after a learner rank dies (``orchestration.recovery``), on stand-in
stages (Ray, vLLM and DeepSpeed are not the subject here; ``tests/e2e/test_chaos.py`` kills a real
rank)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray

from orchestration import placement
from orchestration.config import load_config
from orchestration.loop import Loop
from orchestration.metrics import MetricsLog
from orchestration.recovery import Recovery

pytestmark = pytest.mark.unit  # pure code in this process


class StandInStages:
    """What a rollback touches when no checkpoint exists yet: the generator pool (its version
    and restores), the fault counters and the sync; one object plays all three."""

    actors = SimpleNamespace(learners=[])

    def __init__(self):
        self.version, self.pushed, self.counted = 0, [], []
        self.pool = self.faults = self
        self.sync = SimpleNamespace(reopen=lambda: None)

    def restore(self, version: int) -> None:  # the pool: every generator serves ``version``
        self.pushed.append(version)
        self.version = version

    def count(self, fault: str, seconds: float) -> None:  # the fault counters
        self.counted.append(fault)


def run_with_deaths(tmp_path: Path, monkeypatch, max_failures: int, deaths: list[int]):
    """Three iterations; iteration ``k`` raises a dead-actor error once for each ``k`` in
    ``deaths``. Returns the loop, the stages, the log and the iterations attempted."""
    cfg = load_config(
        "demo", ["iterations=3", f"cluster.max_failures={max_failures}", f"logging.root={tmp_path}"]
    )
    trainer = StandInStages()
    recovery = Recovery(cfg, "model", 0, tmp_path)
    loop = Loop(cfg, trainer, None, tmp_path, recovery=recovery)
    rebuilds, attempted = [], []

    def step(k: int):
        attempted.append(k)
        if k in deaths:
            deaths.remove(k)
            raise ray.exceptions.RayActorError()
        trainer.version += 1
        return {"rollout/weight_version": trainer.version - 1.0}, 0

    monkeypatch.setattr(loop, "step", step)
    monkeypatch.setattr(loop, "state_dict", lambda: {"weight_version": trainer.version})
    monkeypatch.setattr(
        loop, "load_state_dict", lambda s: setattr(trainer, "version", s["weight_version"])
    )
    monkeypatch.setattr(
        recovery, "learner_died", lambda e, learners: isinstance(e, ray.exceptions.RayError)
    )
    monkeypatch.setattr(loop, "save_checkpoint", lambda k: None)
    monkeypatch.setattr(placement, "rebuild_learners", lambda *a: rebuilds.append(a))
    log = MetricsLog(tmp_path, cfg.iterations, progress_bar=False)
    return loop, trainer, log, attempted, rebuilds


def test_a_dead_learner_rank_rebuilds_the_group_and_reruns_from_the_start(tmp_path, monkeypatch):
    loop, trainer, log, attempted, rebuilds = run_with_deaths(tmp_path, monkeypatch, 2, [1, 1])
    loop.run(log)
    log.close()
    assert attempted == [0, 1, 0, 1, 0, 1, 2]  # no checkpoint yet: back to the initial state
    assert len(rebuilds) == 2 and trainer.counted == ["learner_rebuilds"] * 2
    assert trainer.pushed == [0, 0]  # the generators get the initial weights back each time
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [0, 1, 2]
    assert [h["rollout/weight_version"] for h in log.history] == [0, 1, 2]


def test_past_max_failures_the_error_stands(tmp_path, monkeypatch):
    loop, trainer, log, attempted, rebuilds = run_with_deaths(tmp_path, monkeypatch, 1, [1, 1])
    with pytest.raises(RuntimeError, match=r"failed 2 times \(cluster.max_failures=1\)") as e:
        loop.run(log)
    log.close()
    assert isinstance(e.value.__cause__, ray.exceptions.RayActorError)
    assert attempted == [0, 1, 0, 1] and len(rebuilds) == 1


def test_an_error_without_a_dead_rank_is_not_retried(tmp_path, monkeypatch):
    loop, trainer, log, attempted, rebuilds = run_with_deaths(tmp_path, monkeypatch, 3, [])
    monkeypatch.setattr(loop.recovery, "learner_died", lambda e, learners: False)
    monkeypatch.setattr(loop, "step", lambda k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        loop.run(log)
    log.close()
    assert rebuilds == [] and trainer.pushed == []


class StandInPool:
    """Generations that record the version served when each was started (the submit) and hand
    back which batch they were (the collect)."""

    def __init__(self):
        self.version, self.started = 0, []

    def submit(self, prompts):
        self.started.append((prompts, self.version))
        return SimpleNamespace(batch=prompts, version=self.version)

    def collect(self, submitted):
        return submitted


@pytest.mark.parametrize("k", [1, 2, 3])
def test_with_max_staleness_k_generations_run_k_ahead_and_train_k_versions_behind(tmp_path, k):
    cfg = load_config(
        "demo",
        [f"max_staleness={k}", "algorithm.off_policy.weight=token", f"logging.root={tmp_path}"],
    )
    pool = StandInPool()
    stages = SimpleNamespace(submit=pool.submit, collect=pool.collect, pool=pool)
    drawn = iter(range(100))
    sampler = SimpleNamespace(next_batch=lambda wanted: next(drawn))
    loop = Loop(cfg, stages, sampler, tmp_path)
    for i in range(6):  # iteration i trains batch i, then syncs version i + 1
        got = loop._generated(4)
        assert got.batch == i  # the batches train in the order they were drawn
        assert i - got.version == min(i, k)  # sampled k versions before the weights it trains
        assert len(loop.pending) == k  # k run ahead while this one trains
        pool.version += 1
    assert [b for b, _ in pool.started] == list(range(6 + k))


def test_extra_rounds_of_dynamic_sampling_come_from_the_generations_ahead(tmp_path):
    """Dynamic sampling asks for more rounds in some iterations: each round takes the oldest
    generation running ahead and starts the next, so the batches keep their order, k stay
    ahead, and none is more than k versions behind the weights it trains."""
    k = 2
    cfg = load_config(
        "demo",
        [f"max_staleness={k}", "algorithm.off_policy.weight=token", f"logging.root={tmp_path}"]
        + ["reward.dynamic_sampling.enabled=true"],
    )
    pool = StandInPool()
    stages = SimpleNamespace(submit=pool.submit, collect=pool.collect, pool=pool)
    drawn = iter(range(100))
    loop = Loop(cfg, stages, SimpleNamespace(next_batch=lambda wanted: next(drawn)), tmp_path)
    trained = []
    for i, rounds in enumerate([1, 3, 1, 2, 1, 1]):  # iteration i trains with version i
        for _ in range(rounds):
            got = loop._generated(4)
            trained.append(got.batch)
            assert 0 <= i - got.version <= k and len(loop.pending) == k
        pool.version += 1
    assert trained == list(range(9))


def test_a_supervised_loop_checkpoints_no_generations_ahead(tmp_path):
    """The supervised stages share Loop's checkpointing, which saves the generations running
    ahead: they have none (the e2e pipeline test checkpoints an SFT stage for real)."""
    from orchestration.loop import SupervisedLoop

    (tmp_path / "sft.jsonl").write_text('{"prompt": "1+2=", "response": "3"}\n')
    cfg = load_config("pipeline-sft", [f"data.source={tmp_path}/sft.jsonl"])
    inputs = type("Inputs", (), {"held_out": None, "__len__": lambda self: 4})()
    loop = SupervisedLoop(cfg, None, inputs, tmp_path)
    assert loop._pending_tables() == {}
