import json
import sys
import types

import pytest

from orchestration.metrics import MetricsLog, TensorBoardSink, WandbSink, prometheus_name

pytestmark = pytest.mark.unit  # pure code in this process


def test_prometheus_names_are_valid_and_distinct():
    assert prometheus_name("reward/exact_integer/mean") == "raylign_reward_exact_integer_mean"
    assert prometheus_name("eval/pass@4") == "raylign_eval_pass_at_4"
    assert prometheus_name("timing/learner_forward") == "raylign_timing_learner_forward"


class Recorder:
    def __init__(self):
        self.calls, self.closed = [], False

    def write(self, iteration, metrics):
        self.calls.append((iteration, metrics))

    def close(self):
        self.closed = True


def test_the_log_writes_json_lines_and_every_sink_the_same_values(tmp_path):
    sink = Recorder()
    log = MetricsLog(tmp_path, 2, progress_bar=False, sinks=[sink])
    log.log(0, {"reward/score_mean": 0.25, "timing/train": 1})
    log.log(1, {"reward/score_mean": 0.5, "eval/pass@1": 0.75})
    log.log(2, {"eval/pass@1": 1.0})  # a final evaluation on its own line
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [0, 1, 2]
    assert lines[0] == {"iteration": 0, "reward/score_mean": 0.25, "timing/train": 1.0}
    assert [(i, m) for i, m in sink.calls] == [
        (x["iteration"], {k: v for k, v in x.items() if k != "iteration"}) for x in lines
    ]
    assert sink.closed


def test_tensorboard_events_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink(tmp_path / "tb")
    sink.write(0, {"reward/score_mean": 0.125, "actor/kl_ref": 0.5})
    sink.write(3, {"reward/score_mean": 0.75})
    sink.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward/score_mean")] == [
        (0, 0.125),
        (3, 0.75),
    ]
    assert [(e.step, e.value) for e in events.Scalars("actor/kl_ref")] == [(0, 0.5)]


def test_wandb_sink_logs_each_iteration_at_its_step(tmp_path, monkeypatch):
    # wandb itself is an optional install; a stand-in records what the sink asks of it.
    calls = {}

    class Run:
        def log(self, metrics, step):
            calls.setdefault("log", []).append((step, metrics))

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    sink = WandbSink(
        tmp_path, "r1", {"seed": 0}, project="p", entity=None, mode="offline", tags=["t"]
    )
    sink.write(2, {"reward/score_mean": 0.5})
    sink.close()
    assert calls["init"]["name"] == "r1" and calls["init"]["mode"] == "offline"
    assert calls["init"]["config"] == {"seed": 0} and calls["init"]["dir"] == str(tmp_path)
    assert calls["log"] == [(2, {"reward/score_mean": 0.5})] and calls["finished"]


def test_wandb_enabled_without_wandb_says_how_to_fix_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(RuntimeError, match="pip install wandb"):
        WandbSink(tmp_path, "r", {}, project="p", entity=None, mode="online", tags=[])


def test_the_printed_line_shows_the_headline_and_the_evaluation(tmp_path, capsys):
    log = MetricsLog(tmp_path, 1, progress_bar=False)
    log.log(0, {"reward/score_mean": 0.5, "eval/pass@2": 0.75, "eval/pass@1": 0.5})
    log.log(1, {"eval/pass@1": 0.625, "eval/exact_integer/mean": 0.7})
    log.close()
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "iter    0 reward=0.5"
    assert out[1] == "iter    0 eval pass@1=0.5 pass@2=0.75"
    assert out[2] == "iter    1 eval pass@1=0.625 exact_integer=0.7"
