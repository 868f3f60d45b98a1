"""The PPO demo learns, and operating it, end to end: ``demo-ppo`` as it is (200 iterations) on a
Ray head of its own (token auth, Prometheus metrics) with a user's Parquet dataset, evaluation,
rollout files and exports on. It passes the demo's learning thresholds (the one PPO learning
proof; measured at seeds 0, 1, 2 with two torch threads per actor: 0.904, 0.958, 0.926), and
everything a person looks at is checked: the Prometheus endpoint while it runs, TensorBoard
against the JSON lines, the report, the Parquet rollouts, the Grafana dashboard's queries, and
the exported policy in transformers and in a fresh vLLM engine against the greedy tokens the
synced generators produced."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from html.parser import HTMLParser

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from orchestration.data import addition_examples
from orchestration.metrics import prometheus_name
from rollout import schema as S
from tests.e2e.helpers import assert_learned, greedy_in_fresh_vllm
from tests.helpers import REPO, free_port, history, ray_head

pytestmark = pytest.mark.slow
ITERATIONS = 200  # the preset's
EVERY = 50  # evaluation, rollout files, exports


def scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()
    except OSError:
        return ""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The run, with the metrics endpoint scraped while it trains: (run_dir, scrape, stdout)."""
    root = tmp_path_factory.mktemp("operate")
    # A user's dataset: Parquet with its own field names, and one row without a prompt.
    rows = [{"question": p, "answer": a} for p, a in addition_examples(4)]
    rows.insert(3, {"question": None, "answer": "1"})
    pq.write_table(pa.Table.from_pylist(rows), root / "addition.parquet")
    metrics_port = free_port()
    args = [
        "--config=demo-ppo",
        f"data.source={root / 'addition.parquet'}",
        "data.prompt_key=question",
        "data.label_key=answer",
        "eval.source=builtin:addition",
        f"eval.every={EVERY}",
        f"logging.rollouts_every={EVERY}",
        f"export.every={EVERY}",
        "export.keep=1",
        f"logging.root={root / 'runs'}",
        "logging.name=op",
        "logging.progress_bar=false",
    ]
    console = root / "console.txt"  # a file, not a pipe: 200 iterations would fill a pipe
    with ray_head(root, f"--metrics-export-port={metrics_port}") as env, console.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestration.train", *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
        seen = ""
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            text = scrape(metrics_port)
            if "ray_raylign_" in text:
                seen = text  # the latest scrape holding our metrics
            time.sleep(2)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    stdout = console.read_text()
    assert proc.returncode == 0, stdout[-6000:]
    return root / "runs" / "op", seen, stdout


def test_ppo_learns_the_demo(run):
    run_dir, _, stdout = run
    summary = json.loads((run_dir / "summary.json").read_text())
    iterations = [h for h in history(run_dir) if "reward/score_mean" in h]  # not the evals
    assert summary["iterations"] == ITERATIONS and f"done: {ITERATIONS} iterations" in stdout
    assert_learned(summary, iterations, "critic/value_loss", "actor/kl_loss")  # PPO: a critic


def test_metrics_reach_rays_prometheus_endpoint_with_run_and_algorithm_labels(run):
    run_dir, text, _ = run
    assert text, "no ray_raylign_ metric was ever exported"
    series = re.findall(r"^(ray_raylign_\w+)\{([^}]*)\} (\S+)$", text, re.M)
    names = {name for name, _, _ in series}
    for key in (
        "reward/score_mean",
        "reward/exact_integer/mean",
        "actor/kl_ref",
        "actor/entropy",
        "actor/grad_norm",
        "rollout/response_length",
        "rollout/truncated_fraction",
        "rollout/logprob_mismatch",
        "reward/zero_spread_groups",
        "reward/unscorable",
        "timing/generate",
        "timing/train",
        "perf/tokens_per_s",
        "sync/seconds",
    ):
        assert "ray_" + prometheus_name(key) in names, key
    labels = dict(re.findall(r'(\w+)="([^"]*)"', series[0][1]))
    assert labels["run"] == "op" and labels["algorithm"] == "gae"  # PPO's estimator
    # The values are the run's own: the exported iteration is one the run logged.
    logged = {h["iteration"] for h in history(run_dir)}
    (iteration,) = {float(v) for n, _, v in series if n == "ray_raylign_iteration"}
    assert iteration in logged


def test_tensorboard_holds_the_json_lines_values(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, _ = run
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    records = history(run_dir)
    assert len([r for r in records if "reward/score_mean" in r]) == ITERATIONS
    checked = 0
    for record in records:
        for key, value in record.items():
            if key == "iteration" or value != value:  # NaN compares unequal to itself
                continue
            steps = {e.step: e.value for e in events.Scalars(key)}
            assert steps[record["iteration"]] == pytest.approx(value, rel=1e-6, abs=1e-7), key
            checked += 1
    assert checked > 100


def test_evaluation_runs_on_schedule_and_reports_pass_at_1(run):
    run_dir, _, stdout = run
    evals = {h["iteration"]: h for h in history(run_dir) if "eval/pass@1" in h}
    assert sorted(evals) == [0, 50, 100, 150, ITERATIONS]  # before 0, 50, ..., and after the last
    for h in evals.values():
        assert 0.0 <= h["eval/pass@1"] <= 1.0 and h["eval/prompts"] == 25
    table = pq.read_table(run_dir / "eval" / f"iter_{ITERATIONS:06d}.parquet")
    assert table.num_rows == 25 and "reward/exact_integer" in table.column_names
    correct = pc.greater_equal(table["reward/exact_integer"], 1.0)
    assert evals[ITERATIONS]["eval/pass@1"] == pytest.approx(pc.mean(correct).as_py())
    assert "eval pass@1=" in stdout


def test_the_malformed_row_is_reported_by_number_and_the_rest_train(run):
    run_dir, _, stdout = run
    assert "skipped: " in stdout and "row 3: no 'question'" in stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["data"] == {
        "data/rows": 26.0,
        "data/loaded": 25.0,
        "data/malformed": 1.0,
        "data/overlong_skipped": 0.0,
        "data/truncated": 0.0,
    }


def test_rollouts_are_written_as_parquet_with_the_rollout_schema(run):
    run_dir, _, _ = run
    files = sorted(p.name for p in (run_dir / "rollouts").glob("*.parquet"))
    assert files == [f"iter_{k:06d}.parquet" for k in (0, 50, 100, 150, ITERATIONS - 1)]
    table = pq.read_table(run_dir / "rollouts" / "iter_000150.parquet")
    for field in S.GENERATOR_FIELDS:
        assert table.schema.field(field.name).type == field.type, field.name
    for column in (S.SCORE, S.ADVANTAGES, S.OLD_LOGPROBS, S.REF_LOGPROBS, "reward/exact_integer"):
        assert column in table.column_names
    assert table.num_rows == 16 * 16
    assert set(table[S.WEIGHT_VERSION].to_pylist()) == {150}


class _Page(HTMLParser):
    """The report's images, figure captions and table cells (text inside nested tags too)."""

    def __init__(self):
        super().__init__()
        self.images, self.captions, self.cells, self._open = [], [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        elif tag in ("figcaption", "td"):
            self._open.append([tag, ""])

    def handle_data(self, data):
        if self._open:
            self._open[-1][1] += data

    def handle_endtag(self, tag):
        if self._open and self._open[-1][0] == tag:
            _, text = self._open.pop()
            (self.captions if tag == "figcaption" else self.cells).append(text.strip())


def test_the_report_has_the_plots_and_early_and_late_samples(run):
    import base64

    run_dir, _, stdout = run
    assert f"report: {run_dir / 'report.html'}" in stdout
    page = _Page()
    page.feed((run_dir / "report.html").read_text())
    captions = " | ".join(page.captions)
    for plot in ("Reward", "KL", "Entropy", "Response length", "stage", "Throughput", "Eval"):
        assert plot in captions, captions
    for img in page.images:
        assert base64.b64decode(img["src"].split(",", 1)[1]).startswith(b"\x89PNG")
    # Sample prompts come from the first and the last saved rollouts, decoded.
    prompts = {p for p, _ in addition_examples(4)}
    assert sum(cell in prompts for cell in page.cells) >= 2


def test_the_grafana_dashboard_queries_metrics_the_run_exports(run):
    run_dir, _, _ = run
    exported = {"ray_" + prometheus_name(k) for h in history(run_dir) for k in h}
    dashboard = json.loads((REPO / "deploy" / "grafana" / "raylign-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    for expr in exprs:
        patterns = re.findall(r'__name__=~"([^"]+)"', expr)
        names = re.findall(r"\bray_raylign_\w+", re.sub(r'__name__[=!]~"[^"]*"', "", expr))
        assert names or patterns, expr
        for name in names:
            assert name in exported, (name, expr)
        for pattern in patterns:
            assert any(re.fullmatch(pattern, n) for n in exported), (pattern, expr)


def test_the_exported_policy_loads_in_transformers_and_vllm_and_generates_the_synced_tokens(run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    run_dir, _, _ = run
    # The periodic exports: after iterations 49, 99 and 149 (the last one's is policy/), only
    # the newest kept; none half-written.
    assert sorted(p.name for p in (run_dir / "exports").iterdir()) == ["iter_000149"]
    policy = run_dir / "policy"
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (policy / name).is_file(), name
    assert not list(policy.glob("*.bin")) and not list(policy.glob("*.pt"))
    # The final evaluation was greedy on the generators after the last weight sync.
    final = pq.read_table(run_dir / "eval" / f"iter_{ITERATIONS:06d}.parquet").to_pylist()
    prompts = [r[S.PROMPT_TOKEN_IDS] for r in final]
    synced = [r[S.RESPONSE_TOKEN_IDS] for r in final]
    tokenizer = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    gen = GenerationConfig.from_pretrained(policy)
    assert gen.eos_token_id == tokenizer.eos_token_id
    hf = []
    for ids in prompts:
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=4, do_sample=False, pad_token_id=gen.pad_token_id
        )
        hf.append(out[0, len(ids) :].tolist())
    assert hf == synced
    assert greedy_in_fresh_vllm(policy, prompts, 4, 32) == synced
