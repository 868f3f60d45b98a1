"""The HTML run report: plots, header, samples and the CLI, over a fake run directory (no Ray)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from transformers import AutoTokenizer

from orchestration.report import (
    NO_ROLLOUTS,
    NO_ROLLOUTS_SUPERVISED,
    SECTIONS,
    Sample,
    load_metrics,
    load_tokenizer,
    main,
    make_figures,
    samples_table,
    write_report,
)
from orchestration.rm_eval import read_rm_eval, rm_metrics, write_rm_eval

TITLES = [title for title, _, _ in SECTIONS]
EOS = "<|endoftext|>"
# (prompt, response text, score) per rollout file; the tokenizer adds EOS to each response.
ROLLOUTS = {
    0: [("3+4=", "7", 1.0), ("1+1=", "3", 0.25), ("2+2=", "4", 0.5)],
    5: [("0+0=", "0", 0.75)],  # a middle file: the report shows only the earliest and latest
    11: [("4+4=", "8", 0.75), ("2+3=", "1", 0.0), ("1+2=", "3", 1.0)],
}


class Page(HTMLParser):
    """What the tests read from a report: figures (alt, src, caption), tables (rows of cell text
    with the table's class), headings and all text."""

    def __init__(self, text: str):
        super().__init__()
        self.figures: list[dict[str, str]] = []
        self.tables: list[tuple[str, list[list[str]]]] = []
        self.headings: list[str] = []
        self.text: list[str] = []
        self._sink: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.figures.append({"alt": attrs["alt"], "src": attrs["src"], "caption": ""})
        elif tag == "table":
            self.tables.append((attrs.get("class", ""), []))
        elif tag == "tr":
            self.tables[-1][1].append([])
        elif tag in ("td", "th"):
            self.tables[-1][1][-1].append("")
        elif tag in ("h1", "h2", "h3"):
            self.headings.append("")

    def handle_data(self, data):
        self.text.append(data)
        tag = self.lasttag
        if tag in ("td", "th") and self.tables and self.tables[-1][1]:
            self.tables[-1][1][-1][-1] += data
        elif tag in ("figcaption", "b") and self.figures:
            self.figures[-1]["caption"] += data
        elif tag in ("h1", "h2", "h3"):
            self.headings[-1] += data

    def table(self, css: str) -> list[list[list[str]]]:
        return [rows for c, rows in self.tables if c == css]


def read_page(path: Path) -> Page:
    return Page(path.read_text(encoding="utf-8"))


def metrics_record(i: int) -> dict:
    record = {
        "iteration": i,
        "reward/score_mean": 0.1 + 0.05 * i,
        "reward/score_max": 1.0,
        "reward/exact_integer/mean": 0.04 * i,
        "reward/format/mean": 0.5,
        "reward/errors/exact_integer": 0.0,  # not a component mean: not on the reward plot
        "actor/kl_ref": 0.01 * i,
        "actor/entropy": float("nan") if i == 3 else 2.0 - 0.1 * i,
        "rollout/response_length": 3.0 + i % 3,
        "rollout/truncated_fraction": 0.1,
        "timing/iteration": 1.0,
        "timing/generate": 0.6,
        "timing/train": 0.3,
        "timing/sync": 0.1,
        "perf/tokens_per_s": 500.0 + i,
        "perf/generated_tokens_per_s": 900.0,
        "perf/samples_per_s": 60.0,
    }
    return record | (eval_record(i) if i % 5 == 0 else {})


def eval_record(i: int) -> dict:
    """What an evaluation adds to iteration ``i``'s record; a run also ends with a record holding
    only the final evaluation."""
    rates = {"eval/score_mean": 0.2 + 0.01 * i, "eval/pass@4": 0.5}
    return rates | {"eval/response_length": 3.5, "timing/eval": 0.2}


def rollout_table(tokenizer, rows: list[tuple[str, str, float]]) -> pa.Table:
    ids = pa.list_(pa.int32())
    return pa.table(
        {
            "prompt_id": pa.array(range(len(rows)), pa.int64()),
            "sample_index": pa.array([0] * len(rows), pa.int32()),
            "prompt_token_ids": pa.array([tokenizer.encode(p) for p, _, _ in rows], ids),
            "response_token_ids": pa.array(
                [tokenizer.encode(r) + [tokenizer.eos_token_id] for _, r, _ in rows], ids
            ),
            "score": pa.array([s for _, _, s in rows], pa.float32()),
            "finish_reason": ["stop"] * len(rows),
            "weight_version": pa.array([0] * len(rows), pa.int64()),
            "reward/exact_integer": pa.array([s for _, _, s in rows], pa.float32()),
            "label": [str(eval(p[:-1])) for p, _, _ in rows],
        }
    )


@pytest.fixture
def run_dir(tmp_path, tiny_model) -> Path:
    """12 iterations of metrics (eval every 5 and at the end, a NaN entropy), three rollout
    files, an eval file, config.yaml pointing model.path at the tiny model, and summary.json."""
    run = tmp_path / "demo-run"
    run.mkdir()
    records = [metrics_record(i) for i in range(12)] + [{"iteration": 12, **eval_record(12)}]
    lines = [json.dumps(r) for r in records]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for folder, files in (("rollouts", ROLLOUTS), ("eval", {10: ROLLOUTS[0]})):
        (run / folder).mkdir()
        for k, rows in files.items():
            pq.write_table(rollout_table(tokenizer, rows), run / folder / f"iter_{k:06d}.parquet")
    config = {"algorithm": {"estimator": "grpo"}, "model": {"path": tiny_model}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    summary = {"iterations": 12, "wall_time_s": 123.4, "reward_first": 0.2, "reward_last": 0.6}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.mark.unit
def test_every_plot_is_an_embedded_png_with_caption_and_alt(run_dir):
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    page = read_page(path)
    assert [f["caption"].split(":")[0] for f in page.figures] == TITLES
    assert [f["alt"] for f in page.figures] == [f"{t} plot" for t in TITLES]
    for figure in page.figures:
        prefix = "data:image/png;base64,"
        assert figure["src"].startswith(prefix)
        assert base64.b64decode(figure["src"][len(prefix) :]).startswith(b"\x89PNG\r\n\x1a\n")
    assert "skipped" not in "".join(page.text)


@pytest.mark.unit
def test_figures_plot_the_metrics_they_name(run_dir):
    figures, skipped = make_figures(load_metrics(run_dir))
    assert skipped == []
    legends = {t: [x.get_text() for x in fig.legends[0].get_texts()] for t, _, fig in figures}
    assert legends["Reward"] == ["score_mean", "exact_integer", "format"]
    assert legends["KL to the reference"] == ["kl_ref"]
    # Stages stacked in pipeline order, the training step as a line, not a stack.
    timing_labels = ["generate", "train", "sync", "eval", "iteration (training step)"]
    assert legends["Time per stage"] == timing_labels
    assert legends["Response length"] == ["response_length", "truncated_fraction"]
    assert legends["Throughput"] == ["tokens_per_s", "generated_tokens_per_s", "samples_per_s"]
    assert legends["Evaluation"] == ["pass@4", "score_mean", "response_length"]
    by_title = {t: fig for t, _, fig in figures}
    # The final evaluation's record (iteration 12) is not a training step: not in the stack.
    stack_top = by_title["Time per stage"].axes[0].collections[-1].get_paths()[0]
    assert stack_top.vertices[:, 0].max() == 11
    rates, others = by_title["Evaluation"].axes  # lengths on their own axis, not with rates
    assert [line.get_label() for line in others.get_lines()] == ["response_length"]
    for line in rates.get_lines() + others.get_lines():  # evaluated iterations, as markers
        assert list(line.get_xdata()) == [0, 5, 10, 12]
        assert line.get_marker() == "o"


@pytest.mark.unit
def test_samples_are_the_first_rows_of_the_earliest_and_latest_files(run_dir):
    page = read_page(write_report(run_dir, samples=2))
    rollouts, evaluation = page.table("samples")
    header = ["iteration", "prompt", "response", "score", "exact_integer", "finish reason"]
    assert rollouts[0] == header
    assert rollouts[1:] == [
        ["0", "3+4=", f"7{EOS}", "1", "1", "stop"],
        ["0", "1+1=", f"3{EOS}", "0.25", "0.25", "stop"],
        ["11", "4+4=", f"8{EOS}", "0.75", "0.75", "stop"],
        ["11", "2+3=", f"1{EOS}", "0", "0", "stop"],
    ]
    assert "Evaluation samples (iteration 10)" in page.headings
    assert [row[:3] for row in evaluation[1:]] == [
        ["10", "3+4=", f"7{EOS}"],
        ["10", "1+1=", f"3{EOS}"],
    ]


@pytest.mark.unit
def test_samples_table_escapes_text():
    sample = Sample(3, "a<b & c", "<script>alert(1)</script>", None, {"x": 0.5}, "stop")
    out = samples_table([sample])
    assert "<script>" not in out
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in out and "a&lt;b &amp; c" in out
    assert Page(out).tables[0][1][1] == ["3", "a<b & c", sample.response, "–", "0.5", "stop"]


@pytest.mark.unit
def test_header_and_last_iteration(run_dir, tiny_model):
    page = read_page(write_report(run_dir))
    assert page.headings[0] == "demo-run"
    meta = dict(row for row in page.table("meta")[0])
    assert meta["algorithm"] == "grpo" and meta["model"] == tiny_model
    assert meta["iterations"] == "12" and meta["wall time"] == "123 s"
    assert meta["reward, first → last iterations"] == "0.2 → 0.6"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d .*", meta["report generated"])
    assert "Last iteration (11)" in page.headings
    rows = page.table("metrics")[0]
    last = dict(rows)
    assert len(last) == len(rows)  # each metric once
    assert last["reward/score_mean"] == "0.65" and last["actor/kl_ref"] == "0.11"
    assert "timing/iteration" in last  # from iteration 11, not the final evaluation's record
    assert last["eval/score_mean (iteration 12)"] == "0.32"


@pytest.mark.unit
def test_metrics_only_run_dir_renders_and_says_no_rollouts(tmp_path):
    lines = [json.dumps({"iteration": i, "reward/score_mean": 0.1 * i}) for i in range(3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    page = read_page(write_report(tmp_path))
    text = "".join(page.text)
    assert [f["alt"] for f in page.figures] == ["Reward plot"]
    assert "skipped, no data: " + ", ".join(TITLES[1:]) in text
    assert NO_ROLLOUTS in text and page.table("samples") == []
    meta = dict(row for row in page.table("meta")[0])
    assert meta["algorithm"] == "unknown (no config.yaml)" and meta["iterations"] == "3"
    assert "no summary.json" in meta["summary"]


@pytest.mark.unit
def test_missing_metrics_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "metrics.jsonl"))):
        write_report(tmp_path)


@pytest.mark.unit
def test_without_a_tokenizer_token_ids_are_shown(run_dir):
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": {"path": "builtin:tiny"}}))
    page = read_page(write_report(run_dir, samples=1))
    assert "no tokenizer loaded" in "".join(page.text)
    prompt = page.table("samples")[0][1][1]
    assert re.fullmatch(r"\[\d+(, \d+)*\]", prompt)


@pytest.mark.unit
def test_tokenizer_skips_a_model_dir_without_tokenizer_files(tmp_path, tiny_model):
    # A saved policy holds weights and config.json only; AutoTokenizer would "load" it with an
    # empty vocabulary, so the base model's tokenizer must win.
    (tmp_path / "policy").mkdir()
    shutil.copy(Path(tiny_model) / "config.json", tmp_path / "policy")
    shutil.copytree(tiny_model, tmp_path / "base_model")
    tokenizer, tried = load_tokenizer(tmp_path, {"model": {"path": "builtin:tiny"}})
    assert tokenizer is not None and tokenizer.decode(tokenizer.encode("3+4=")) == "3+4="
    assert tried[:2] == [str(tmp_path / "policy"), str(tmp_path / "base_model")]


@pytest.mark.unit
def test_cli_writes_the_report(run_dir, tmp_path, capsys):
    out = tmp_path / "elsewhere.html"
    assert main([str(run_dir), "--out", str(out), "--samples", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert len(read_page(out).table("samples")[0]) == 1 + 2  # header, one row per file
    assert not (run_dir / "report.html").exists()


@pytest.mark.component  # the command in a child process
def test_cli_missing_run_dir_exits_2(tmp_path):
    missing = tmp_path / "no-such-run"
    result = subprocess.run(
        [sys.executable, "-m", "orchestration.report", str(missing)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: no run directory at {missing}"]
    assert not missing.exists()


@pytest.mark.unit
def test_cli_run_dir_without_metrics_exits_2(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: no metrics file at {tmp_path}")


@pytest.mark.unit
def test_a_slow_first_iteration_does_not_flatten_the_stage_plot(run_dir):
    """Iteration 0 takes 20x the others (engine warm-up): the scale follows the others, and
    the warm-up is labelled with its time."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records[0] |= {"timing/iteration": 20.0, "timing/generate": 19.6}
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    figures, _ = make_figures(load_metrics(run_dir))
    ax = {t: fig for t, _, fig in figures}["Time per stage"].axes[0]
    assert ax.get_ylim()[1] == pytest.approx(1.3)  # 1.3 x the slowest normal iteration (1 s)
    assert [t.get_text() for t in ax.texts] == ["20.0 s"]


# ------------------------------------------------------------------------------ supervised runs


def sft_records(n: int = 10) -> list[dict]:
    """``n`` SFT iterations; held-out evaluation as records of its own at 0, 5 and after the
    last iteration (so the training series are NaN there)."""
    records = []
    for i in range(n):
        records.append(
            {
                "iteration": i,
                "sft/loss": 2.0 - 0.1 * i,
                "sft/accuracy": 0.3 + 0.02 * i,
                "actor/lr": 1e-5,
                "actor/grad_norm": 1.5,
            }
        )
        if i % 5 == 0:
            records.append(
                {"iteration": i, "eval/sft_loss": 2.1 - 0.1 * i, "eval/sft_accuracy": 0.3}
            )
    return records + [{"iteration": n, "eval/sft_loss": 1.2, "eval/sft_accuracy": 0.5}]


@pytest.fixture
def sft_run(tmp_path) -> Path:
    """A supervised run: metrics.jsonl, summary.json without rewards, two reward-model
    evaluations; no config, rollouts or eval parquet."""
    run = tmp_path / "sft-run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft_records()))
    (run / "summary.json").write_text(json.dumps({"iterations": 10, "wall_time_s": 50.0}))
    # 4 pairs (tests/orchestration/test_rm_eval.py): accuracy 0.625, longer preferred 2/3.
    scores = np.array([2.0, 1.0, 0.5, 3.0]), np.array([1.0, 1.0, 1.5, 0.0])
    lengths = np.array([10, 5, 3, 16]), np.array([4, 5, 8, 18])
    write_rm_eval(run, "held_out", rm_metrics(*scores, *lengths, [0, 3, 6]))
    write_rm_eval(run, "equal_quality", rm_metrics(scores[0] + 1, scores[1], *lengths, [0]))
    return run


@pytest.mark.unit
def test_training_records_include_supervised_ones(sft_run):
    m = load_metrics(sft_run)
    assert m.trained == 10 and m.last["iteration"] == 9 and m.supervised.startswith("SFT")
    assert m.training.sum() == 10 and len(m.training) == 13  # and 3 evaluation records


@pytest.mark.unit
def test_supervised_run_has_its_loss_figure_and_no_rl_ones(sft_run):
    figures, skipped = make_figures(load_metrics(sft_run))
    assert skipped == []  # an RL figure's absence is no news in a supervised run
    by_title = {t: fig for t, _, fig in figures}
    assert list(by_title) == ["Supervised loss", "Optimizer"]
    legends = {t: [x.get_text() for x in fig.legends[0].get_texts()] for t, fig in by_title.items()}
    assert legends["Supervised loss"] == [
        "sft/loss",
        "eval/sft_loss",
        "sft/accuracy",
        "eval/sft_accuracy",
    ]
    assert legends["Optimizer"] == ["actor/grad_norm", "actor/lr"]
    losses, accuracies = by_title["Supervised loss"].axes  # accuracy on its own axis
    train, held_out = losses.get_lines()
    assert list(train.get_xdata()) == list(range(10))  # unbroken by the evaluation records
    assert list(held_out.get_xdata()) == [0, 5, 10] and held_out.get_marker() == "o"
    assert [line.get_linestyle() for line in accuracies.get_lines()] == ["--", "--"]


@pytest.mark.unit
def test_supervised_report_page(sft_run):
    page = read_page(write_report(sft_run))
    text = "".join(page.text)
    assert [f["alt"] for f in page.figures] == [
        "Supervised loss plot",
        "Optimizer plot",
        "Reward model calibration plot",
    ]
    assert "skipped" not in text
    meta = dict(row for row in page.table("meta")[0])
    assert meta["algorithm"] == "SFT (supervised fine-tuning)" and meta["iterations"] == "10"
    assert "reward, first → last iterations" not in meta
    last = dict(page.table("metrics")[0])
    assert last["sft/loss"] == "1.1" and last["actor/lr"] == "1e-05"
    assert last["eval/sft_loss (iteration 10)"] == "1.2"
    # The reward-model section: one table of numbers and one of buckets per evaluation, by name.
    assert page.headings[page.headings.index("Reward model") :][1:3] == [
        "equal_quality",
        "held_out",
    ]
    equal, held_out = (dict((k.split(" (")[0], v) for k, v in t) for t in page.table("rm"))
    saved = read_rm_eval(sft_run)["held_out"]
    assert held_out == {
        "accuracy": "0.625",
        "pairs": "4",
        "longer preferred": "0.6667",
        "length correlation": f"{saved['length_correlation']:.4g}",
        "ECE": f"{saved['ece']:.4g}",
    }
    assert equal["accuracy"] == "0.875"  # +1 on chosen: pair 2 (0.5 + 1 vs 1.5) becomes a tie
    buckets = page.table("rm-buckets")[1]
    assert buckets == [
        ["length difference (tokens)", "pairs", "accuracy", "longer preferred"],
        ["[0, 3)", "2", "0.75", "0"],
        ["[3, 6)", "1", "0", "1"],
        ["[6, inf)", "1", "1", "1"],
    ]
    assert "Reward model calibration" in [f["caption"].split(":")[0] for f in page.figures]
    assert NO_ROLLOUTS_SUPERVISED in text and NO_ROLLOUTS not in text
    assert page.table("samples") == []


@pytest.mark.unit
def test_reward_model_run_plots_its_margin(tmp_path):
    records = [
        {"iteration": i, "rm/loss": 0.7 - 0.05 * i, "rm/accuracy": 0.5 + 0.04 * i}
        | {"rm/margin_mean": 0.1 * i}
        | ({"eval/rm_accuracy": 0.6, "eval/rm_loss": 0.65} if i == 4 else {})
        for i in range(5)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    figures, skipped = make_figures(load_metrics(tmp_path))
    legends = {t: [x.get_text() for x in fig.legends[0].get_texts()] for t, _, fig in figures}
    assert legends == {
        "Supervised loss": ["rm/loss", "eval/rm_loss", "rm/accuracy", "eval/rm_accuracy"],
        "Reward margin": ["margin_mean"],
    }
    assert skipped == []
    meta = dict(row for row in read_page(write_report(tmp_path)).table("meta")[0])
    assert meta["algorithm"] == "reward model"


@pytest.mark.unit
def test_rl_run_with_a_pretraining_loss_adds_the_figure_after_the_rl_ones(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in records[:-1]:
        r["actor/ptx_loss"] = 1.0
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    figures, skipped = make_figures(load_metrics(run_dir))
    assert [t for t, _, _ in figures] == [*TITLES, "Supervised loss"] and skipped == []
    assert [x.get_text() for x in figures[-1][2].legends[0].get_texts()] == ["actor/ptx_loss"]
    assert load_metrics(run_dir).supervised is None


@pytest.mark.unit
def test_an_episode_shows_its_turns_apart():
    from orchestration.report import Sample, episode_turns, samples_table

    turns = episode_turns([3, 2, 7, 8, 4], [1.0, 1.0, 0.0, 0.0, 1.0])
    assert turns == [(True, [3, 2]), (False, [7, 8]), (True, [4])]
    sample = Sample(
        0,
        "p",
        "ab<o>c",
        1.0,
        {},
        "stop",
        turns=((True, "ab"), (False, "<o>"), (True, "c")),
        episode_end="done",
    )
    html = samples_table([sample])
    assert '<div class="model">ab</div><div class="observation">&lt;o&gt;</div>' in html
    assert "stop (done)" in html
