"""A learned reward model drives PPO, and operating the run, end to end: ``demo-rm`` (a reward model
trained at start, then PPO on its score; 150 iterations) on a Ray head of its own (token auth,
Prometheus metrics) with evaluation, rollout files and exports on. It is the one learning proof
of PPO (a critic) and of a learned reward model: the policy climbs the reward model's score, and
the task's rule, which the policy never sees, rises with it. Everything a person looks at is
checked: the Prometheus endpoint while it runs, TensorBoard against the JSON lines, the report,
the Parquet rollouts, the Grafana dashboard's queries, and the exported policy in transformers
and in a fresh vLLM engine against the greedy tokens the synced generators produced. The trained
reward model then serves a one-iteration run with reference baselines."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from html.parser import HTMLParser

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from orchestration.data import addition_examples
from orchestration.metrics import prometheus_name
from rollout import schema as S
from tests.e2e.helpers import check_run_health, finished, greedy_in_fresh_vllm, train
from tests.helpers import REPO, free_port, history, ray_head

pytestmark = pytest.mark.slow
ITERATIONS = 150
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
    metrics_port = free_port()
    args = [
        "--config=demo-rm",
        f"iterations={ITERATIONS}",
        "eval.source=builtin:addition",
        f"eval.every={EVERY}",
        f"logging.rollouts_every={EVERY}",
        f"export.every={EVERY}",
        "export.keep=1",
        f"logging.root={root / 'runs'}",
        "logging.name=op",
        "logging.progress_bar=false",
    ]
    console = root / "console.txt"  # a file, not a pipe: 150 iterations would fill a pipe
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


def test_a_learned_reward_model_drives_ppo_and_the_rule_metric_it_never_saw_improves(run):
    run_dir, _, stdout = run
    summary = json.loads((run_dir / "summary.json").read_text())
    iterations = [h for h in history(run_dir) if "reward/score_mean" in h]  # not the evals
    assert summary["iterations"] == ITERATIONS and f"done: {ITERATIONS} iterations" in stdout
    check_run_health(iterations)
    assert "critic/value_loss" in iterations[-1] and "actor/kl_loss" not in iterations[-1]
    rm = json.loads((run_dir / "reward_model_rm" / "train_metrics.json").read_text())
    assert rm["held_out_accuracy"] > 0.9  # pairs the reward model was not trained on
    # Only the reward model is in the score; exact_integer is a monitor.
    assert all(h["reward/raw_mean"] == pytest.approx(h["reward/rm/mean"]) for h in iterations)
    rule = [h["reward/exact_integer/mean"] for h in iterations]
    first, last = np.mean(rule[:5]), np.mean(rule[-10:])
    learned = [h["reward/rm/mean"] for h in iterations]
    # The policy climbs the learned score: over the first and last 5 iterations it rose by 5.2
    # to 8.9 in the five 150-iteration runs measured (this preset at seed 0, and with
    # algorithm.entropy_coef=0.03 at seeds 0, 1, 2 and data.seed=1) ...
    assert np.mean(learned[-5:]) - np.mean(learned[:5]) > 4.0, learned
    # ... and the rule metric it never saw rises from the junk level (~0.07: untrained
    # responses rarely stop with an integer): to 0.19-0.84 (last 10) in those runs. How far
    # depends on the seed: the policy often settles on one integer per prompt, right or not.
    assert first < 0.15
    assert last > 0.15 and last > 2 * first, rule


def test_reference_baseline_centres_the_reference_policys_own_scores(run, head_env, tmp_path):
    """The run's reward model scores the untrained policy far below zero; at iteration 0 the
    policy *is* the reference, so after subtracting the baseline its scores average ~0."""
    run_dir, _, _ = run
    out = train(
        [
            "--config",
            "demo-rm",
            "iterations=1",
            f"reward.models=[{{name: rm, path: {run_dir / 'reward_model_rm'}}}]",
            "reward.reference_baseline=true",
            "reward.reference_baseline_samples=16",
            f"logging.root={tmp_path / 'runs'}",
        ],
        head_env,
    )
    summary, (first,) = finished(out, tmp_path / "runs")
    assert "reference baseline: 25 prompts" in out.stdout
    assert "reward model rm: training" not in out.stdout  # the run's own, trained above
    assert first["reward/raw_mean"] < -1.0
    assert first["reward/baseline_missing"] == 0
    # Noise: 256 samples against 16 x 25 baseline samples of a score with std ~1.5 -> ~0.12.
    assert abs(first["reward/score_mean"]) < 0.35
    assert abs(first["reward/score_mean"]) < abs(first["reward/raw_mean"]) / 4


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
    assert sorted(evals) == [0, 50, 100, ITERATIONS]  # before 0, 50, 100, and after the last
    for h in evals.values():
        assert 0.0 <= h["eval/pass@1"] <= 1.0 and h["eval/prompts"] == 25
    table = pq.read_table(run_dir / "eval" / f"iter_{ITERATIONS:06d}.parquet")
    assert table.num_rows == 25 and "reward/exact_integer" in table.column_names
    correct = pc.greater_equal(table["reward/exact_integer"], 1.0)
    assert evals[ITERATIONS]["eval/pass@1"] == pytest.approx(pc.mean(correct).as_py())
    assert "eval pass@1=" in stdout


def test_rollouts_are_written_as_parquet_with_the_rollout_schema(run):
    run_dir, _, _ = run
    files = sorted(p.name for p in (run_dir / "rollouts").glob("*.parquet"))
    assert files == [f"iter_{k:06d}.parquet" for k in (0, 50, 100, ITERATIONS - 1)]
    table = pq.read_table(run_dir / "rollouts" / "iter_000100.parquet")
    for field in S.GENERATOR_FIELDS:
        assert table.schema.field(field.name).type == field.type, field.name
    for column in (S.SCORE, S.ADVANTAGES, S.OLD_LOGPROBS, S.REF_LOGPROBS, "reward/exact_integer"):
        assert column in table.column_names
    assert table.num_rows == 16 * 16
    assert set(table[S.WEIGHT_VERSION].to_pylist()) == {100}


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
    # The periodic exports: after iterations 49 and 99 (the last one's is policy/), only the
    # newest kept; none half-written.
    assert sorted(p.name for p in (run_dir / "exports").iterdir()) == ["iter_000099"]
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
