"""An HTML report for a run directory: training curves, the last iteration's numbers, the reward
model's evaluation and sample prompts and responses, in one self-contained file (plots embedded
as PNG; no network, no JS). RL and supervised (SFT, reward model) runs alike.

    python -m orchestration.report runs/<run> [--out PATH] [--samples N]

Reads ``metrics.jsonl`` (required) and, when present, ``config.yaml``, ``summary.json``,
``rollouts/iter_<k>.parquet``, ``eval/iter_<k>.parquet`` and ``rm_eval/<name>.json``
(``orchestration.rm_eval``); writes ``<run_dir>/report.html``. Any metric may be missing: an RL
run's plot with no data is skipped and named in a note; the plots only some runs have
(supervised losses, learning rate) are left out silently.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import yaml
from matplotlib.axes import Axes
from matplotlib.figure import Figure  # used without pyplot: Agg canvas, no global figure state
from matplotlib.ticker import MaxNLocator

from orchestration.metrics import HEADLINE
from orchestration.report_rm import BUCKET_HEAD, calibration_figure, rm_bucket_rows, rm_rows
from orchestration.rm_eval import read_rm_eval

# The printed line's metrics, then a few more (dict.fromkeys: in order, without repeats).
SUMMARY_KEYS = tuple(
    dict.fromkeys([*HEADLINE, "reward/score_max", "actor/grad_norm", "critic/value_loss"])
    | dict.fromkeys(["rollout/truncated_fraction", "perf/tokens_per_s", "perf/samples_per_s"])
    | dict.fromkeys(["sft/loss", "sft/accuracy", "rm/loss", "rm/accuracy", "rm/margin_mean"])
    | dict.fromkeys(["actor/ptx_loss", "actor/lr"])
)
STAGES = ("generate", "reward", "reference", "learner_forward", "advantages", "train", "sync")
STAGES += ("eval", "export")  # pipeline order, so the stacked areas read bottom-up as the loop
ROLLING_FROM = 30  # series at least this long get a rolling mean over faint raw values
OUTLIER_FACTOR = 3.0  # an iteration over this many times the median is drawn off the scale
NO_ROLLOUTS = "no rollouts saved; set logging.rollouts_every"
NO_ROLLOUTS_SUPERVISED = "no rollouts: a supervised run generates none"
# A supervised run's kind, from the training loss it logs; a run with neither is RL.
SUPERVISED = {"sft/loss": "SFT (supervised fine-tuning)", "rm/loss": "reward model"}
LOSSES = ("sft/loss", "eval/sft_loss", "rm/loss", "eval/rm_loss", "actor/ptx_loss")
ACCURACIES = ("sft/accuracy", "eval/sft_accuracy", "rm/accuracy", "eval/rm_accuracy")
SAMPLE_COLUMNS = (
    "prompt_token_ids",
    "response_token_ids",
    "score",
    "finish_reason",
    "loss_mask",
    "episode_end",
    "turns",
)


@dataclass(frozen=True)
class Metrics:
    """``metrics.jsonl`` as columns: ``iteration`` (N,), one (N,) float array per metric name
    (NaN where an iteration did not log it); ``training`` (N,) True on the training records; and
    their count and last record (a run with evaluation ends on a record holding only the final
    evaluation)."""

    iteration: np.ndarray
    columns: dict[str, np.ndarray]
    training: np.ndarray
    trained: int
    last: dict[str, Any]

    def get(self, name: str) -> np.ndarray | None:
        """The metric's values, or None when no iteration has a finite value for it."""
        values = self.columns.get(name)
        return values if values is not None and np.isfinite(values).any() else None

    def names(self, pattern: str) -> list[str]:
        """Metric names matching the regex ``pattern`` in full that have data, sorted."""
        return sorted(
            n for n in self.columns if re.fullmatch(pattern, n) and self.get(n) is not None
        )

    @property
    def supervised(self) -> str | None:
        """The supervised run's kind (a ``SUPERVISED`` value), or None for an RL run."""
        if self.get("reward/score_mean") is not None:
            return None
        return next((kind for n, kind in SUPERVISED.items() if self.get(n) is not None), None)


def _is_training(record: dict) -> bool:
    """A training iteration's record (RL's ``reward/*``, supervised ``sft/*`` or ``rm/*``, any
    other stage's metrics), not an evaluation's alone (``eval/*``, ``timing/eval``)."""
    return any(not k.startswith(("eval/", "timing/eval")) for k in record if k != "iteration")


def load_metrics(run_dir: Path) -> Metrics:
    """``<run_dir>/metrics.jsonl`` (NaN literals allowed); FileNotFoundError naming the path."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}: is {run_dir} a run directory?")
    records = []
    for i, line in enumerate(path.read_text().splitlines()):
        try:
            records += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {i + 1}: not valid JSON ({e})") from None
    names = sorted({k for r in records for k in r} - {"iteration"})
    number = (int, float)
    columns = {
        n: np.array([r[n] if isinstance(r.get(n), number) else np.nan for r in records], float)
        for n in names
    }
    iteration = np.array([r.get("iteration", i) for i, r in enumerate(records)], float)
    is_training = np.array([_is_training(r) for r in records], bool)
    training = [r for r, t in zip(records, is_training, strict=True) if t]
    last = training[-1] if training else records[-1] if records else {}
    return Metrics(iteration, columns, is_training, len(training), last)


# ------------------------------------------------------------------------------ plots


def _short(name: str) -> str:
    """Legend label: ``reward/exact_integer/mean`` -> ``exact_integer``."""
    return name.split("/", 1)[-1].removesuffix("/mean")


def _rolling_mean(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` points, skipping NaNs."""
    ok = np.isfinite(y)
    total = np.convolve(np.where(ok, y, 0.0), np.ones(window))[: len(y)]
    count = np.convolve(ok.astype(float), np.ones(window))[: len(y)]
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _line(ax: Axes, x: np.ndarray, y: np.ndarray, label: str, **style) -> None:
    if np.isfinite(y).sum() < ROLLING_FROM:
        ax.plot(x, y, label=label, **style)
        return
    window = max(3, len(y) // 20)
    raw = ax.plot(x, y, alpha=0.25, lw=1, **style)[0]
    style["color"] = raw.get_color()
    ax.plot(x, _rolling_mean(y, window), label=f"{label} (mean of {window})", **style)


def _series(ax: Axes, m: Metrics, name: str, label: str, **style) -> None:
    """A metric as a line over the training records; an ``eval/*`` one (sparse) as markers at the
    iterations evaluated."""
    if name.startswith("eval/"):
        ok = np.isfinite(m.columns[name])
        ax.plot(m.iteration[ok], m.columns[name][ok], marker="o", label=label, **style)
    else:
        _line(ax, m.iteration[m.training], m.columns[name][m.training], label, **style)


def _lines(ax: Axes, m: Metrics, names: list[str], unit: str, label=_short) -> bool:
    """Each named metric with data as a line; False when none has data."""
    drawn = [n for n in names if m.get(n) is not None]
    for n in drawn:
        _series(ax, m, n, label(n))
    ax.set_ylabel(unit)
    return bool(drawn)


def _two_scales(
    ax: Axes, m: Metrics, left: list[str], right: list[str], units: tuple[str, str], label=_short
) -> bool:
    """``left`` on ``ax``, ``right`` dashed on a twin y axis when both have data (units differ);
    ``label`` names a metric's line."""
    left, right = ([n for n in names if m.get(n) is not None] for names in (left, right))
    _lines(ax, m, left, units[0], label)
    other = ax.twinx() if left and right else ax
    for i, n in enumerate(right, len(left)):  # the twin axis starts its own colour cycle
        _series(other, m, n, label(n), color=f"C{i}", ls="--")
    if right:
        other.set_ylabel(units[1])
    return bool(left or right)


def _plot_reward(ax: Axes, m: Metrics) -> bool:
    return _lines(ax, m, ["reward/score_mean", *m.names(r"reward/[^/]+/mean")], "reward")


def _plot_timing(ax: Axes, m: Metrics) -> bool:
    names = [n for n in m.names(r"timing/.+") if n != "timing/iteration"]
    names.sort(key=lambda n: (STAGES.index(_short(n)) if _short(n) in STAGES else len(STAGES), n))
    if not names:
        return False
    total = m.get("timing/iteration")
    # Training iterations only: the final evaluation's record would drop the stack to zero.
    rows = np.isfinite(total) if total is not None else np.ones(len(m.iteration), bool)
    stacks = [np.nan_to_num(m.columns[n][rows]) for n in names]
    x = m.iteration[rows]
    ax.stackplot(x, stacks, labels=[_short(n) for n in names], alpha=0.85)
    if total is not None:
        ax.plot(x, total[rows], "k--", lw=1, label="iteration (training step)")
    ax.set_ylabel("seconds")
    # The first iteration (engine warm-up) and recoveries can take 10-50x a normal one and
    # would flatten every other: the scale follows the normal iterations, and each outlier is
    # labelled with its time at the top edge.
    step = total[rows] if total is not None else np.sum(stacks, axis=0)
    outlier = step > OUTLIER_FACTOR * np.nanmedian(step)
    if outlier.any() and (~outlier).sum() >= 2:
        top = 1.3 * np.nanmax(step[~outlier])
        ax.set_ylim(0, top)
        for xi, yi in zip(x[outlier], step[outlier], strict=True):
            ax.annotate(
                f"{yi:.1f} s", (xi, top), xytext=(2, -12), textcoords="offset points", fontsize=8
            )
    return True


def _plot_eval(ax: Axes, m: Metrics) -> bool:
    """Rates in [0, 1] (scores, pass@k, fractions) on the left axis; the rest (lengths, counts)
    dashed on a twin right axis. Sparse: markers at the evaluated iterations. Not the supervised
    held-out metrics: they are on the supervised loss plot."""
    # eval/prompts is a constant, the set's size.
    names = [n for n in m.names(r"eval/(?!(sft|rm)_).+") if n != "eval/prompts"]
    rates = [n for n in names if np.nanmin(m.columns[n]) >= 0 and np.nanmax(m.columns[n]) <= 1]
    other = [n for n in names if n not in rates]
    right = ax.twinx() if rates and other else ax
    for i, n in enumerate(rates + other):
        ok = np.isfinite(m.columns[n])
        axis = ax if n in rates else right
        style = "--" if axis is not ax else "-"
        axis.plot(
            m.iteration[ok], m.columns[n][ok], style, marker="o", color=f"C{i}", label=_short(n)
        )
    ax.set_ylabel("rate" if rates else "value")
    if right is not ax:
        right.set_ylabel("value")
    return bool(names)


Draw = Callable[[Axes, Metrics], bool]
SECTIONS: tuple[tuple[str, str, Draw], ...] = (
    ("Reward", "mean score per iteration, and the mean of each reward component", _plot_reward),
    ("KL to the reference", "actor/kl_ref: the policy's KL to the frozen reference",
     lambda ax, m: _lines(ax, m, ["actor/kl_ref"], "KL")),
    ("Entropy", "actor/entropy: mean per-token entropy of the policy",
     lambda ax, m: _lines(ax, m, ["actor/entropy"], "nats")),
    ("Response length", "mean response length; dashed, right axis: fraction cut at the limit",
     lambda ax, m: _two_scales(ax, m, ["rollout/response_length"], ["rollout/truncated_fraction"],
                               ("tokens", "fraction truncated"))),
    ("Time per stage", "seconds per stage, stacked; dashed: timing/iteration, the training step "
     "(evaluation and export run outside it); iterations over 3x the median (the first one's "
     "engine warm-up, recoveries) are off the scale, labelled with their time", _plot_timing),
    ("Throughput", "tokens (prompt + response) per second of the iteration, generated tokens "
     "per second of generation; dashed, right axis: samples per second",
     lambda ax, m: _two_scales(ax, m, ["perf/tokens_per_s", "perf/generated_tokens_per_s"],
                               ["perf/samples_per_s"], ("tokens / s", "samples / s"))),
    ("Evaluation", "eval/* at the iterations that ran one; dashed, right axis: metrics "
     "outside [0, 1]", _plot_eval),
)  # fmt: skip
# Metrics only some runs log: drawn when there is data, never named as skipped.
OPTIONAL_SECTIONS: tuple[tuple[str, str, Draw], ...] = (
    ("Supervised loss", "training loss per iteration (sft/loss; rm/loss, the pairwise ranking "
     "loss; actor/ptx_loss, an RL run's pretraining term) and held-out loss (eval/*, markers "
     "at the evaluated iterations); dashed, right axis: accuracy (SFT: of the next token; "
     "reward model: of the pair's ranking)",
     lambda ax, m: _two_scales(ax, m, list(LOSSES), list(ACCURACIES), ("loss", "accuracy"), str)),
    ("Reward margin", "rm/margin_mean: the mean over the batch's pairs of r_w - r_l, the chosen "
     "response's score less the other's", lambda ax, m: _lines(ax, m, ["rm/margin_mean"], "score")),
    ("Optimizer", "gradient norm of each model's update; dashed, right axis: learning rate",
     lambda ax, m: _two_scales(ax, m, m.names(r"[^/]+/grad_norm"), m.names(r"[^/]+/lr"),
                               ("gradient norm", "learning rate"), str)),
)  # fmt: skip


def make_figures(m: Metrics) -> tuple[list[tuple[str, str, Figure]], list[str]]:
    """One figure per section with data, as (title, caption, figure); and the skipped titles:
    an RL run's ``SECTIONS`` without data (a supervised run's are left out silently)."""
    figures, skipped, supervised = [], [], m.supervised is not None
    rl = [title for title, _, _ in SECTIONS]
    order = (*OPTIONAL_SECTIONS, *SECTIONS) if supervised else (*SECTIONS, *OPTIONAL_SECTIONS)
    for title, caption, draw in order:
        fig = Figure(figsize=(9, 3.2), layout="constrained")
        ax = fig.add_subplot()
        if not draw(ax, m):
            if title in rl and not supervised:
                skipped.append(title)
            continue
        ax.set(title=title, xlabel="iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        pairs = [hl for a in fig.axes for hl in zip(*a.get_legend_handles_labels(), strict=True)]
        fig.legend(*zip(*pairs, strict=True), loc="outside right upper", fontsize="small")
        figures.append((title, caption, fig))
    return figures, skipped


def _png_base64(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ------------------------------------------------------------------------------ samples


@dataclass(frozen=True)
class Sample:
    """One rollout row, decoded for display; ``score`` None means unscorable."""

    iteration: int
    prompt: str
    response: str
    score: float | None
    rewards: dict[str, float | None]  # component -> value, from the ``reward/<component>`` columns
    finish_reason: str
    # Multi-turn episodes: the response's turns in order, (True: the model's, text), and why
    # the episode ended; empty for one-turn samples.
    turns: tuple[tuple[bool, str], ...] = ()
    episode_end: str = ""


def episode_turns(response: list[int], mask: list[float]) -> list[tuple[bool, list[int]]]:
    """A multi-turn response cut into its turns: runs of the model's tokens (mask 1) and of
    observation tokens (mask 0), in order."""
    turns: list[tuple[bool, list[int]]] = []
    for token, m in zip(response, mask, strict=True):
        model = m > 0.5
        if not turns or turns[-1][0] != model:
            turns.append((model, []))
        turns[-1][1].append(token)
    return turns


def iteration_files(folder: Path) -> list[tuple[int, Path]]:
    """``iter_<k>.parquet`` files in ``folder`` as (k, path), by iteration."""
    found = [(re.fullmatch(r"iter_(\d+)\.parquet", p.name), p) for p in folder.glob("iter_*")]
    return sorted((int(match[1]), p) for match, p in found if match)


def load_tokenizer(run_dir: Path, config: dict) -> tuple[Any | None, list[str]]:
    """The run's tokenizer from ``policy/``, else ``base_model/``, else config's ``model.path``
    (local files only); returns (tokenizer or None, the places tried)."""
    from transformers import AutoTokenizer  # slow import: only for runs with rollouts

    model_path = str((config.get("model") or {}).get("path") or "")
    tried = [str(run_dir / "policy"), str(run_dir / "base_model"), model_path]
    for place in filter(None, tried):
        local = Path(place)
        # A model directory without tokenizer files still "loads" (an empty vocabulary from
        # config.json), so a local directory must hold the tokenizer's own files.
        if local.is_dir() and not any(local.glob("tokenizer*")):
            continue
        if place.startswith("builtin:") or (not local.is_dir() and local.is_absolute()):
            continue
        try:
            return AutoTokenizer.from_pretrained(
                place, trust_remote_code=False, local_files_only=True
            ), tried
        except (OSError, ValueError):  # not a tokenizer here, or not in the local hub cache
            continue
    return None, tried


def read_samples(path: Path, iteration: int, n: int, tokenizer: Any | None) -> list[Sample]:
    """The first ``n`` rows of a rollout file, or with multi-turn episodes up to ``n // 2`` of
    them with more than one turn first (among the first rows); token ids shown as a list
    without a tokenizer."""
    names = pq.read_schema(path).names
    columns = [c for c in names if c in SAMPLE_COLUMNS or re.fullmatch(r"reward/[^/]+", c)]
    size = max(n, 1) * (64 if "turns" in names else 1)
    batch = next(pq.ParquetFile(path).iter_batches(batch_size=size, columns=columns), None)
    rows = batch.to_pylist() if batch is not None else []
    if "turns" in names:  # show what the episodes look like: some with several turns
        several = [r for r in rows if (r.get("turns") or 0) > 1][: n // 2]
        rows = several + [r for r in rows if all(r is not s for s in several)]
    rows = rows[:n]

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False) if tokenizer else str(ids)

    return [
        Sample(
            iteration=iteration,
            prompt=decode(r.get("prompt_token_ids") or []),
            response=decode(r.get("response_token_ids") or []),
            score=r.get("score"),
            rewards={k.removeprefix("reward/"): v for k, v in r.items() if k.startswith("reward/")},
            finish_reason=r.get("finish_reason") or "",
            turns=tuple(
                (model, decode(ids))
                for model, ids in episode_turns(r["response_token_ids"], r["loss_mask"])
            )
            if r.get("loss_mask") is not None
            else (),
            episode_end=r.get("episode_end") or "",
        )
        for r in rows
    ]


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _grid(head: list[str], rows: list[str], css: str) -> str:
    """An HTML table: a header row of ``head`` (escaped) over ``rows`` (each a row's cells)."""
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(f"<tr>{cells}</tr>" for cells in rows)
    return f'<table class="{css}"><tr>{header}</tr>{body}</table>'


def samples_table(samples: list[Sample]) -> str:
    """An HTML table of samples; every value escaped."""
    components = sorted({c for s in samples for c in s.rewards})
    head = ["iteration", "prompt", "response", "score", *components, "finish reason"]
    rows = []
    for s in samples:
        cells = [f"<td>{s.iteration}</td>", f'<td class="text">{html.escape(s.prompt)}</td>']
        if s.turns:  # an episode: each turn in its own block, the observations set apart
            blocks = "".join(
                f'<div class="{"model" if model else "observation"}">{html.escape(text)}</div>'
                for model, text in s.turns
            )
            cells.append(f'<td class="text">{blocks}</td>')
        else:
            cells.append(f'<td class="text">{html.escape(s.response)}</td>')
        numbers = [s.score, *(s.rewards.get(c) for c in components)]
        cells += [f"<td>{html.escape(_fmt(v))}</td>" for v in numbers]
        ending = f"{s.finish_reason} ({s.episode_end})" if s.episode_end else s.finish_reason
        cells.append(f"<td>{html.escape(ending)}</td>")
        rows.append("".join(cells))
    return _grid(head, rows, "samples")


def _samples_html(run_dir: Path, config: dict, n: int, supervised: bool) -> str:
    rollouts = iteration_files(run_dir / "rollouts")
    evals = iteration_files(run_dir / "eval")
    out = ["<h2>Samples</h2>"]
    if not rollouts:
        out.append(f'<p class="note">{NO_ROLLOUTS_SUPERVISED if supervised else NO_ROLLOUTS}</p>')
    if not rollouts and not evals:
        return "".join(out)
    tokenizer, tried = load_tokenizer(run_dir, config)
    if tokenizer is None:
        where = ", ".join(tried)
        out.append(
            f'<p class="note">no tokenizer loaded (tried {html.escape(where)}): token ids</p>'
        )
    picks = sorted({rollouts[0], rollouts[-1]}) if rollouts else []
    if picks:
        out.append(f'<p class="note">first {n} rows of the earliest and latest rollout files</p>')
        out.append(samples_table([s for k, p in picks for s in read_samples(p, k, n, tokenizer)]))
    if evals:
        k, path = evals[-1]
        out.append(f"<h3>Evaluation samples (iteration {k})</h3>")
        out.append(samples_table(read_samples(path, k, n, tokenizer)))
    return "".join(out)


# ------------------------------------------------------------------------------ page


def _read_optional(path: Path) -> dict:
    """A YAML or JSON mapping (YAML reads both), or {} when the file is missing."""
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text())
    return data if isinstance(data, dict) else {}


def _table(rows: list[tuple[str, str]], css: str) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f'<table class="{css}">{body}</table>'


def _header_html(run_dir: Path, m: Metrics, config: dict, summary: dict) -> str:
    estimator = (config.get("algorithm") or {}).get("estimator", "unknown (no config.yaml)")
    rows = [
        ("algorithm", str(m.supervised or estimator)),
        ("model", str((config.get("model") or {}).get("path", "unknown (no config.yaml)"))),
        ("iterations", str(summary.get("iterations", m.trained))),
    ]
    if summary:
        wall = summary.get("wall_time_s")
        rows.append(("wall time", f"{wall:.0f} s" if isinstance(wall, (int, float)) else "–"))
        first, last = summary.get("reward_first"), summary.get("reward_last")
        if first is not None or last is not None:  # an RL run's
            rows.append(("reward, first → last iterations", f"{_fmt(first)} → {_fmt(last)}"))
    else:
        rows.append(("summary", "no summary.json: the run failed or is still running"))
    rows.append(("report generated", datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")))
    return f"<h1>{html.escape(run_dir.resolve().name)}</h1>{_table(rows, 'meta')}"


def _last_iteration_html(m: Metrics) -> str:
    if not m.last:
        return "<h2>Last iteration</h2><p class='note'>metrics.jsonl is empty</p>"
    rows = [(k, _fmt(m.last[k])) for k in SUMMARY_KEYS if k in m.last]
    for name in m.names(r"eval/.+"):  # evaluation is sparse: its latest value, and when
        at = np.flatnonzero(np.isfinite(m.columns[name]))[-1]
        rows.append((f"{name} (iteration {int(m.iteration[at])})", _fmt(m.columns[name][at])))
    title = f"Last iteration ({m.last.get('iteration', len(m.iteration) - 1)})"
    return f"<h2>{html.escape(str(title))}</h2>{_table(rows, 'metrics')}"


def _figure_html(title: str, caption: str, fig: Figure) -> str:
    alt, src = html.escape(f"{title} plot"), f"data:image/png;base64,{_png_base64(fig)}"
    text = f"<b>{html.escape(title)}</b>: {html.escape(caption)}"
    return f'<figure><img alt="{alt}" src="{src}"><figcaption>{text}</figcaption></figure>'


def _figures_html(m: Metrics) -> str:
    figures, skipped = make_figures(m)
    out = ["<h2>Training curves</h2>", *(_figure_html(*figure) for figure in figures)]
    if skipped:
        out.append(f'<p class="note">skipped, no data: {html.escape(", ".join(skipped))}</p>')
    return "".join(out)


def _reward_model_html(run_dir: Path) -> str:
    """The ``rm_eval/`` results: a table of each evaluation set's numbers and its accuracy by
    length difference, then one calibration plot of them all; "" when there are none."""
    evals = read_rm_eval(run_dir)
    if not evals:
        return ""
    out = ["<h2>Reward model</h2>"]
    for name, metrics in evals.items():
        out.append(f"<h3>{html.escape(name)}</h3>")
        out.append(_table([(k, _fmt(v)) for k, v in rm_rows(metrics)], "rm"))
        rows = [
            "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) for r in rm_bucket_rows(metrics)
        ]
        out.append(_grid(list(BUCKET_HEAD), rows, "rm-buckets"))
    figure = calibration_figure(evals)
    if figure is not None:
        out.append(_figure_html(*figure))
    return "".join(out)


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:3px 8px;
text-align:left;vertical-align:top}td.text{font-family:monospace;white-space:pre-wrap;
max-width:420px;word-break:break-all}figure{margin:1em 0}img{max-width:100%}
figcaption,.note{color:#555;font-size:.9em}td.text div{padding:1px 3px;margin:1px 0}
div.model{border-left:3px solid #36c}div.observation{border-left:3px solid #aaa;background:#f3f3f3;
color:#555}"""


def write_report(run_dir: str | Path, out: str | Path | None = None, *, samples: int = 4) -> Path:
    """Write the run's report (``<run_dir>/report.html`` unless ``out``); returns its path.
    Raises FileNotFoundError when ``run_dir`` has no ``metrics.jsonl``."""
    run_dir = Path(run_dir)
    m = load_metrics(run_dir)
    config = _read_optional(run_dir / "config.yaml")
    summary = _read_optional(run_dir / "summary.json")
    body = _header_html(run_dir, m, config, summary) + _last_iteration_html(m)
    body += _figures_html(m) + _reward_model_html(run_dir)
    body += _samples_html(run_dir, config, samples, m.supervised is not None)
    title = html.escape(f"Raylign report: {run_dir.resolve().name}")
    page = f'<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>'
    page += f"<style>{CSS}</style></head><body>{body}</body></html>\n"
    path = Path(out) if out is not None else run_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestration.report", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="the run directory")
    parser.add_argument("--out", type=Path, help="output file (default: <run_dir>/report.html)")
    parser.add_argument("--samples", type=int, default=4, help="sample rows per rollout file")
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        print(f"error: no run directory at {args.run_dir}", file=sys.stderr)
        return 2
    try:
        print(write_report(args.run_dir, args.out, samples=args.samples))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
