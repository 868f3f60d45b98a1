"""The pipeline runner (``orchestration.pipeline``): the file's validation, substitutions, the
skip / changed / --from / --only decisions (pure), the table, and the runner's bookkeeping with
train replaced by a fake. Real pipelines end to end: ``tests/e2e/test_pipeline.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from orchestration import pipeline as pl
from orchestration import pipeline_spec as ps
from orchestration.pipeline import Action, OnDisk, PipelineError, Row

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, tree: dict) -> str:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return str(path)


def two_stages(root: str = "runs/p", **rm) -> dict:
    return {
        "name": "t",
        "root": root,
        "demo_data": "data/p",
        "stages": [
            {"name": "sft", "config": "pipeline-sft", "overrides": {"iterations": 3}},
            {
                "name": "rm",
                "config": "pipeline-rm",
                "overrides": {"model.path": "{sft.policy}", **rm},
            },
        ],
    }


def error_of(tmp_path, tree, *overrides) -> str:
    with pytest.raises(PipelineError) as e:
        ps.read_pipeline(write(tmp_path, tree), list(overrides))
    return str(e.value)


# ------------------------------------------------------------------------------ the file


@pytest.mark.unit
def test_unknown_keys_are_named_with_a_suggestion(tmp_path):
    tree = two_stages()
    tree["nmae"] = tree.pop("name")
    tree["stages"][1]["metrc"] = "rm/loss"
    msg = error_of(tmp_path, tree)
    assert "nmae: unknown key; did you mean 'name'?" in msg
    assert "stages.rm.metrc: unknown key; did you mean 'metric'?" in msg
    assert "name: Field required" in msg


@pytest.mark.unit
def test_duplicate_and_malformed_stage_names(tmp_path):
    tree = two_stages()
    tree["stages"][1]["name"] = "sft"
    assert "'sft' names more than one stage" in error_of(tmp_path, tree)
    tree["stages"][1]["name"] = "RM"
    assert "stages.1.name: String should match pattern" in error_of(tmp_path, tree)


@pytest.mark.unit
def test_references_to_later_missing_or_unknown_outputs(tmp_path):
    tree = two_stages(**{"data.source": "{rm.dir}/x", "rm.normalize_source": "{sfft.policy}"})
    tree["stages"][0]["overrides"]["model.path"] = "{rm.policy}"
    tree["stages"][1]["overrides"]["rm.equal_quality_source"] = "{sft.weights}"
    tree["stages"][1]["overrides"]["seed"] = "{nothing}"
    msg = error_of(tmp_path, tree)
    assert "stages.sft.overrides.model.path: {rm.policy}: stage rm comes later" in msg
    assert "stages.rm.overrides.data.source: {rm.dir}: stage rm is this stage" in msg
    assert "{sfft.policy}: no stage is named 'sfft'; did you mean 'sft'?" in msg
    assert "stages.rm.overrides.rm.equal_quality_source: unknown substitution {sft.weights}" in msg
    assert "stages.rm.overrides.seed: unknown substitution {nothing}" in msg


@pytest.mark.unit
def test_demo_data_unset_unquoted_placeholder_owned_keys_and_wrong_outputs(tmp_path):
    tree = two_stages(**{"data.source": "{demo_data}/preferences.jsonl"})
    del tree["demo_data"]
    assert "{demo_data}, but the pipeline sets no demo_data" in error_of(tmp_path, tree)
    # YAML reads an unquoted {sft.policy} as a mapping
    path = tmp_path / "u.yaml"
    path.write_text(
        "name: t\nroot: r\nstages:\n  - {name: sft, config: pipeline-sft}\n"
        "  - name: rm\n    config: pipeline-rm\n    overrides:\n      model.path: {sft.policy}\n"
    )
    with pytest.raises(PipelineError, match=r'read as a YAML mapping; quote it: "\{sft.policy\}"'):
        ps.read_pipeline(str(path))
    tree = two_stages(**{"logging.name": "x"})
    assert "logging.name is set by the pipeline for every stage" in error_of(tmp_path, tree)
    tree = two_stages(**{"learner.critic_init": "{sft.reward_model}"})
    assert "{sft.reward_model}: stage sft is a stage=sft run, which writes no reward_model/" in (
        error_of(tmp_path, tree)
    )
    tree = two_stages()
    tree["stages"][0]["config"] = "no-such-preset"
    assert "stages.sft.config: 'no-such-preset' is neither a preset" in error_of(tmp_path, tree)


@pytest.mark.unit
def test_cli_overrides_of_the_pipeline_file(tmp_path):
    spec = ps.read_pipeline(
        write(tmp_path, two_stages()),
        ["root=/tmp/elsewhere", "stages.sft.overrides.learner.lr=0.001", "stages.1.metric=x/y"],
    )
    assert spec.root == "/tmp/elsewhere"
    assert spec.stages[0].overrides == {"iterations": 3, "learner.lr": 0.001}
    assert spec.stages[1].metric == "x/y"
    assert "no stage 'ppo' (stages: sft, rm)" in error_of(tmp_path, two_stages(), "stages.ppo.x=1")
    assert "is not key=value" in error_of(tmp_path, two_stages(), "root")


@pytest.mark.unit
def test_main_exits_2_on_bad_input(tmp_path, capsys):
    tree = two_stages(**{"model.path": "{ppo.policy}"})
    assert pl.main(["--config", write(tmp_path, tree)]) == 2
    assert "no stage is named 'ppo'" in capsys.readouterr().err
    good = write(tmp_path, two_stages(root=str(tmp_path / "r")))
    assert pl.main(["--config", good, "--from", "ppo"]) == 2
    assert "--from ppo: no such stage (stages: sft, rm)" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing ran, nothing written


# ------------------------------------------------------------------------------ substitutions


@pytest.mark.unit
def test_stage_arguments_after_substitution(tmp_path):
    root = tmp_path / "runs"
    tree = two_stages(
        root=str(root),
        **{
            "reward.models": [{"name": "rm", "path": "{sft.dir}/rm"}],
            "rm.normalize_source": "{demo_data}/sft.jsonl",
            "sft.template": "{{literal}} in {root}",
        },
    )
    spec = ps.read_pipeline(write(tmp_path, tree))
    data = Path("data/p").resolve()
    assert ps.stage_args(spec, 1, root) == [
        "--config",
        "pipeline-rm",
        f"logging.root={root}",
        "logging.name=rm",
        "resume=auto",
        f"model.path={root}/sft/policy",
        f"reward.models=[{{name: rm, path: {root}/sft/rm}}]",
        f"rm.normalize_source={data}/sft.jsonl",
        f"sft.template='{{literal}} in {root}'",
    ]
    assert ps.uses(spec.stages[1]) == ["sft"] and ps.uses(spec.stages[0]) == []


@pytest.mark.unit
@pytest.mark.parametrize(
    "value",
    ["plain", "/a b/c", "yes", "1e-3", "a: b", "{x}", "{x} y", "[x", 3, 1e-3, None, True, [1, "x"]],
)
def test_values_reach_train_as_they_were(value):
    # train reads each key=value's value as YAML: the dump must load back to the same value
    assert yaml.safe_load(ps.yaml_value(value)) == value
    assert "\n" not in ps.yaml_value(value)


@pytest.mark.unit
def test_every_shipped_pipeline_reads_and_runs_presets_that_exist():
    from orchestration.config import presets

    assert ps.pipelines() == ["calculator", "demo", "methods"]
    for name in ps.pipelines():
        spec = ps.read_pipeline(name)
        assert spec.stages, name
        assert all(stage.config in presets() for stage in spec.stages), name


@pytest.mark.unit
def test_the_demo_pipeline_overrides_every_path_its_presets_hard_code():
    spec = ps.read_pipeline("demo")
    assert [(s.name, s.config) for s in spec.stages] == [
        ("sft", "pipeline-sft"),
        ("rm", "pipeline-rm"),
        ("ppo", "pipeline-ppo"),
    ]

    def paths(tree, prefix=""):
        for k, v in tree.items():
            if isinstance(v, dict):
                yield from paths(v, f"{prefix}{k}.")
            elif "runs/" in str(v) or "data/pipeline" in str(v):
                yield f"{prefix}{k}"

    for stage in spec.stages:
        preset = yaml.safe_load((ps.PRESET_DIR / f"{stage.config}.yaml").read_text())
        assert set(paths(preset)) <= set(stage.overrides), stage.name
    root = Path("/r")
    args = ps.stage_args(spec, 2, root)
    assert "reward.models=[{name: rm, path: /r/rm/reward_model}]" in args
    assert "learner.critic_init=/r/rm/reward_model" in args
    assert "model.path=/r/sft/policy" in args


# ------------------------------------------------------------------------------ decisions

ARGS = ["--config", "pipeline-sft", "logging.name=a", "iterations=3"]
NEW, DONE, CUT = OnDisk(False, False), OnDisk(True, True), OnDisk(True, False)


def rec(args=ARGS, status="done", finished="t1", inputs=None) -> dict:
    return {
        "args": args,
        "args_hash": pl.args_hash(args),
        "status": status,
        "finished_at": finished,
        "inputs": inputs or {},
    }


@pytest.mark.unit
def test_decide_each_case():
    assert pl.decide("a", ARGS, NEW, None).action is Action.RUN
    assert pl.decide("a", ARGS, DONE, rec()).action is Action.SKIP
    assert pl.decide("a", ARGS, DONE, rec(status="running")).action is Action.SKIP  # killed after
    assert pl.decide("a", ARGS, DONE, rec(status="failed")).action is Action.RESUME
    step = pl.decide("a", ARGS, CUT, rec(status="running"))
    assert step.action is Action.RESUME and "resume=auto continues" in step.note
    changed = [*ARGS[:-1], "iterations=5"]
    step = pl.decide("a", changed, CUT, rec())
    assert step.action is Action.RESUME and "iterations: 3 -> 5" in step.note
    with pytest.raises(PipelineError) as e:
        pl.decide("a", [*changed, "seed=1"], DONE, rec())
    assert "stage a is done, but its arguments changed" in str(e.value)
    assert "iterations: 3 -> 5" in str(e.value) and "seed: <absent> -> 1" in str(e.value)
    assert "pass --from a to redo it and every stage after it" in str(e.value)
    with pytest.raises(PipelineError, match="finished run this pipeline has no record of"):
        pl.decide("a", ARGS, DONE, None)


def plan(disk, records, **kw):
    names = ["a", "b", "c"]
    inputs = {"a": [], "b": ["a"], "c": ["b"]}
    steps = pl.plan(names, dict.fromkeys(names, ARGS), inputs, disk, records, **kw)
    return [(s.stage, s.action) for s in steps]


def chain_done() -> dict:
    return {
        "a": rec(finished="t1"),
        "b": rec(finished="t2", inputs={"a": "t1"}),
        "c": rec(finished="t3", inputs={"b": "t2"}),
    }


@pytest.mark.unit
def test_plan_skips_done_resumes_cut_runs_new():
    records = chain_done()
    disk = {"a": DONE, "b": DONE, "c": DONE}
    assert plan(disk, records) == [("a", Action.SKIP), ("b", Action.SKIP), ("c", Action.SKIP)]
    del records["c"]
    disk = {"a": DONE, "b": DONE, "c": NEW}
    assert plan(disk, records) == [("a", Action.SKIP), ("b", Action.SKIP), ("c", Action.RUN)]
    disk["b"] = CUT
    assert plan(disk, records)[1:] == [("b", Action.RESUME), ("c", Action.RUN)]


@pytest.mark.unit
def test_plan_from_redoes_the_rest_and_needs_the_stages_before_done():
    disk = {"a": DONE, "b": DONE, "c": NEW}
    records = chain_done()
    assert plan(disk, records, start="b") == [
        ("a", Action.SKIP),
        ("b", Action.REDO),
        ("c", Action.RUN),
    ]
    with pytest.raises(PipelineError, match="stage a comes before --from b but is not done"):
        plan({"a": CUT, "b": DONE, "c": DONE}, records, start="b")


@pytest.mark.unit
def test_plan_only_runs_one_stage():
    disk = {"a": DONE, "b": NEW, "c": NEW}
    assert plan(disk, chain_done(), only="b") == [("b", Action.RUN)]
    assert plan({"a": DONE, "b": DONE, "c": DONE}, chain_done(), only="c") == [("c", Action.SKIP)]


@pytest.mark.unit
def test_plan_refuses_a_done_stage_whose_inputs_were_made_again():
    disk = {"a": CUT, "b": DONE, "c": DONE}
    with pytest.raises(PipelineError) as e:  # a will run again, b read the old a
        plan(disk, chain_done())
    assert "stage b is done, but a, whose outputs it reads, was made again" in str(e.value)
    records = chain_done()
    records["a"]["finished_at"] = "t9"  # a re-ran (say with --only a) after b was made
    with pytest.raises(PipelineError, match="pass --from b"):
        plan({"a": DONE, "b": DONE, "c": DONE}, records)


@pytest.mark.unit
def test_plan_lists_every_problem():
    records = chain_done()
    records["a"] = rec(args=["--config", "x"])
    records["c"] = rec(args=["--config", "y"], inputs={"b": "t2"})
    with pytest.raises(PipelineError) as e:
        plan({"a": DONE, "b": DONE, "c": DONE}, records)
    assert "stage a is done, but" in str(e.value) and "stage c is done, but" in str(e.value)


# ------------------------------------------------------------------------------ the table


@pytest.mark.unit
def test_table_columns_align():
    rows = [
        Row("sft", "done", 12.34, "sft/loss", 2.5, 0.123456),
        Row("rm", "pending", None, "rm/loss", None, None),
    ]
    assert pl.format_table(rows) == (
        "stage | status  | wall time (s) | metric   | before -> after\n"
        "------+---------+---------------+----------+----------------\n"
        "sft   | done    | 12.3          | sft/loss | 2.5 -> 0.1235\n"
        "rm    | pending | -             | rm/loss  | -"
    )


@pytest.mark.unit
def test_metric_before_and_after(tmp_path):
    records = [{"iteration": i, "m": float(i)} for i in range(12)] + [{"eval/x": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert pl.metric_change(tmp_path, "m") == (2.0, 9.0)  # mean of 0..4, mean of 7..11
    assert pl.metric_change(tmp_path, "absent") == (None, None)
    (tmp_path / "summary.json").write_text(json.dumps({"loss_first": 2.0, "loss_last": 0.5}))
    assert pl.metric_change(tmp_path, None) == (2.0, 0.5)


@pytest.mark.unit
def test_first_last_is_trains():
    from orchestration.train import FIRST_LAST

    assert pl.FIRST_LAST == FIRST_LAST


# ------------------------------------------------------------------------------ the runner


class FakeTrain:
    """train replaced: writes the run directory's summary, metrics and policy as a run would."""

    def __init__(self):
        self.calls: list[list[str]] = []
        self.fail: dict[str, int] = {}

    def __call__(self, args: list[str]) -> int:
        self.calls.append(args)
        kv = dict(a.partition("=")[::2] for a in args if "=" in a)
        run_dir = Path(kv["logging.root"]) / kv["logging.name"]
        (run_dir / "policy").mkdir(parents=True, exist_ok=True)
        lines = [{"iteration": i, "sft/loss": 1.0 / (i + 1)} for i in range(3)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        if kv["logging.name"] in self.fail:
            return self.fail[kv["logging.name"]]
        (run_dir / "summary.json").write_text(json.dumps({"loss_first": 1.0, "loss_last": 0.3}))
        return 0


@pytest.mark.unit
def test_runner_records_skips_redoes_and_stops_on_failure(tmp_path, monkeypatch, capsys):
    fake = FakeTrain()
    monkeypatch.setattr(pl, "run_train", fake)
    root, data = tmp_path / "runs", tmp_path / "data"
    tree = two_stages(root=str(root), **{"data.source": "{demo_data}/preferences.jsonl"})
    tree["demo_data"] = str(data)
    config = write(tmp_path, tree)

    assert pl.main(["--config", config]) == 0
    assert (data / "sft.jsonl").is_file()  # the demo data, written first
    assert [c[c.index("--config") + 1] for c in fake.calls] == ["pipeline-sft", "pipeline-rm"]
    state = json.loads((root / "pipeline.json").read_text())
    assert [r["status"] for r in state["table"]] == ["done", "done"]
    assert state["stages"]["rm"]["inputs"] == {"sft": state["stages"]["sft"]["finished_at"]}
    assert state["table"][0]["before"] == 1.0 and state["table"][0]["after"] == 0.3
    assert "sft   | done" in capsys.readouterr().out

    fake.calls.clear()
    assert pl.main(["--config", config]) == 0
    out = capsys.readouterr().out
    assert fake.calls == [] and "stage sft: done (sft/loss 1 -> 0.3" in out
    assert "stage rm: done" in out and "skipped" in out

    assert pl.main(["--config", config, "stages.rm.overrides.seed=3"]) == 2
    err = capsys.readouterr().err
    assert "stage rm is done, but its arguments changed:\n    seed: <absent> -> 3" in err

    fake.fail["rm"] = 7
    assert pl.main(["--config", config, "--from", "rm", "stages.rm.overrides.seed=3"]) == 7
    captured = capsys.readouterr()
    assert "error: stage rm failed (exit 7)" in captured.err and "--from rm" in captured.err
    (moved,) = root.glob("rm.replaced-*")
    assert (moved / "summary.json").is_file()  # the old run kept
    assert json.loads((root / "pipeline.json").read_text())["stages"]["rm"]["status"] == "failed"

    del fake.fail["rm"]
    fake.calls.clear()
    assert pl.main(["--config", config, "stages.rm.overrides.seed=3"]) == 0
    assert "interrupted (no summary.json): resume=auto continues" in capsys.readouterr().out
    assert len(fake.calls) == 1 and "seed=3" in fake.calls[0]


@pytest.mark.unit
def test_only_needs_its_inputs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pl, "run_train", FakeTrain())
    root = tmp_path / "runs"
    config = write(tmp_path, {**two_stages(root=str(root)), "demo_data": str(tmp_path / "d")})
    assert pl.main(["--config", config, "--only", "rm"]) == 2
    assert f"--only rm: its inputs do not exist: {root}/sft/policy" in capsys.readouterr().err
    assert pl.main(["--config", config, "--only", "sft"]) == 0
    assert pl.main(["--config", config, "--only", "rm"]) == 0
    assert pl.main(["--config", config]) == 0
    assert "stage rm: done" in capsys.readouterr().out


@pytest.mark.unit
def test_demo_data_is_never_half_rewritten(tmp_path):
    (tmp_path / "sft.jsonl").write_text("mine\n")
    with pytest.raises(PipelineError, match="lacks preferences.jsonl, equal_quality.jsonl"):
        pl.ensure_demo_data(tmp_path)
    assert (tmp_path / "sft.jsonl").read_text() == "mine\n"


@pytest.mark.unit
def test_rename_away_keeps_both(tmp_path):
    (tmp_path / "a").mkdir()
    first = pl.rename_away(tmp_path / "a")
    (tmp_path / "a").mkdir()
    second = pl.rename_away(tmp_path / "a")
    assert first != second and first.is_dir() and second.is_dir()
    assert first.name.startswith("a.replaced-") and first.name.endswith("Z")


# ------------------------------------------------------------------------------ end to end
