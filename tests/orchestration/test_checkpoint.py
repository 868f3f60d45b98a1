"""Run checkpoints, driver side: which checkpoint resume takes, retention, the config check,
RNG round trips, and the metrics log going back to a checkpoint."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import yaml

from orchestration import checkpoint
from orchestration.config import load_config
from orchestration.metrics import MetricsLog

pytestmark = pytest.mark.unit  # pure code in this process


def fake_checkpoint(run_dir, k: int, commit: bool = True, cfg=None):
    path = checkpoint.directory(run_dir, k)
    path.mkdir(parents=True)
    config = (cfg or load_config("demo", [])).model_dump(mode="json")
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "driver.json").write_text(json.dumps({"iteration": k}))
    if commit:
        (path / checkpoint.MARKER).write_text("{}")
    return path


def test_resume_takes_the_newest_committed_checkpoint_and_names_the_torn_ones(tmp_path):
    assert checkpoint.find_latest(tmp_path) == (None, [])
    fake_checkpoint(tmp_path, 3)
    good = fake_checkpoint(tmp_path, 10)  # iter_000010 sorts after iter_000003
    torn = [fake_checkpoint(tmp_path, 20, commit=False), fake_checkpoint(tmp_path, 30, False)]
    latest, ignored = checkpoint.find_latest(tmp_path)
    assert latest == good and sorted(ignored) == torn


def test_prune_keeps_the_newest_committed_and_drops_older_torn_writes(tmp_path):
    for k in (1, 2, 4):
        fake_checkpoint(tmp_path, k)
    fake_checkpoint(tmp_path, 3, commit=False)  # older than the newest committed: garbage
    fake_checkpoint(tmp_path, 5, commit=False)  # newer: maybe being written, left alone
    checkpoint.prune(tmp_path, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["iter_000002", "iter_000004", "iter_000005"]


def test_a_checkpoint_from_another_config_is_refused_with_every_difference(tmp_path):
    path = fake_checkpoint(tmp_path, 1)
    ok = load_config("demo", ["iterations=500", "logging.name=x", "eval.every=3"])
    assert checkpoint.check_compatible(path, ok.model_dump(mode="json")) == {"iteration": 1}
    bad = load_config("demo", ["learner.lr=1e-3", "model.dtype=bfloat16", "data.seed=4"])
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.check_compatible(path, bad.model_dump(mode="json"))
    message = str(err.value)
    assert f"checkpoint {path} was written with a different config:" in message
    for line in (
        "learner.lr: 0.0005 -> 0.001",
        "model.dtype: 'float32' -> 'bfloat16'",
        "data.seed: 0 -> 4",
    ):
        assert line in message
    assert "iterations" not in message


def test_a_cosine_schedule_pins_the_run_length(tmp_path):
    cfg = load_config("demo", ["learner.lr_schedule=cosine"])
    path = fake_checkpoint(tmp_path, 1, cfg=cfg)
    longer = load_config("demo", ["learner.lr_schedule=cosine", "iterations=400"])
    with pytest.raises(checkpoint.CheckpointError, match="iterations: 200 -> 400 .the cosine"):
        checkpoint.check_compatible(path, longer.model_dump(mode="json"))


def test_an_uncommitted_checkpoint_is_refused_by_path(tmp_path):
    path = fake_checkpoint(tmp_path, 1, commit=False)
    with pytest.raises(checkpoint.CheckpointError, match="is not committed .no COMMITTED"):
        checkpoint.check_compatible(path, load_config("demo", []).model_dump(mode="json"))


def test_rng_states_survive_json():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = json.loads(json.dumps(checkpoint.rng_states()))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.set_rng_states(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_the_metrics_log_goes_back_to_a_checkpoint(tmp_path):
    log = MetricsLog(tmp_path, 10, progress_bar=False)
    for k in range(5):
        log.log(k, {"reward/score_mean": float(k)})
    log.rewind(2)  # a rollback to the checkpoint after iteration 2
    log.log(3, {"reward/score_mean": 30.0})
    log.close()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["reward/score_mean"]) for r in records] == [
        (0, 0.0),
        (1, 1.0),
        (2, 2.0),
        (3, 30.0),
    ]
    resumed = MetricsLog(tmp_path, 10, progress_bar=False, keep_through=1)  # a resumed process
    assert [r["iteration"] for r in resumed.history] == [0, 1]
    resumed.close()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
