"""Per-iteration metrics, written everywhere people look: a JSON line each in
``<run_dir>/metrics.jsonl``, Ray gauges (Prometheus and the dashboard), TensorBoard event files,
Weights & Biases when enabled, a printed line and a progress bar; plus stage timers.

Names are namespaced by stage: ``rollout/``, ``reward/`` (one ``reward/<component>/mean`` per
component), ``actor/``, ``critic/``, ``advantage/``, ``sync/``, ``timing/<stage>`` seconds,
``perf/`` throughput, ``eval/`` (evaluation iterations only) and ``data/``.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

# The few metrics a person reads first, in this order, with short names for the printed line.
HEADLINE = {
    "reward/score_mean": "reward",
    "actor/kl_ref": "kl",
    "actor/entropy": "entropy",
    "actor/clipfrac": "clipfrac",
    "rollout/response_length": "len",
    "rollout/truncated_fraction": "trunc",
    "rollout/logprob_mismatch": "mismatch",
    "actor/ptx_loss": "ptx",
    "sft/loss": "loss",
    "sft/accuracy": "acc",
    "rm/loss": "loss",
    "rm/accuracy": "acc",
    "dpo/loss": "loss",
    "dpo/accuracy": "acc",
    "rrhf/loss": "loss",
    "rs/kept_fraction": "kept",
    "distill/reverse_kl": "rkl",
    "timing/iteration": "s/it",
}

# A training iteration's record has one of these (the rest, the final evaluation, has none).
TRAINED = ("reward/score_mean", "sft/loss", "rm/loss", "dpo/loss")


class StageTimer:
    """Wall time of each named stage of one iteration, as ``timing/<stage>`` seconds."""

    def __init__(self):
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[f"timing/{stage}"] = time.perf_counter() - start


class Sink(Protocol):
    """Somewhere an iteration's metrics also go."""

    def write(self, iteration: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def prometheus_name(key: str) -> str:
    """``reward/exact_integer/mean`` -> ``raylign_reward_exact_integer_mean``; Ray adds its
    ``ray_`` prefix on the Prometheus endpoint (``ray_raylign_...``)."""
    return "raylign_" + re.sub(r"[^a-zA-Z0-9_]", "_", key.replace("@", "_at_"))


class RayMetricsSink:
    """Every metric as a ``ray.util.metrics.Gauge`` tagged with the run and algorithm, so it
    reaches each node's Prometheus endpoint (``metrics_export_port``) and, with Prometheus and
    Grafana set up, the dashboard's metrics view. Gauges are made on first use; a non-finite
    value is not set (Prometheus would keep the last finite one)."""

    TAG_KEYS = ("run", "algorithm")

    def __init__(self, run: str, algorithm: str):
        self.tags = {"run": run, "algorithm": algorithm}
        self._gauges: dict[str, object] = {}

    def write(self, iteration: int, metrics: dict[str, float]) -> None:
        for key, value in {"iteration": float(iteration), **metrics}.items():
            if math.isfinite(value):
                self._gauge(key).set(value, tags=self.tags)

    def _gauge(self, key: str):
        if key not in self._gauges:
            from ray.util.metrics import Gauge

            self._gauges[key] = Gauge(prometheus_name(key), description=key, tag_keys=self.TAG_KEYS)
        return self._gauges[key]

    def close(self) -> None:
        pass


class TensorBoardSink:
    """Scalars under their metric names (``reward/score_mean`` ...) at step = iteration."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def rewind(self, keep_through: int) -> None:
        """Later steps are dropped by TensorBoard's readers once a write at ``purge_step``
        follows."""
        from torch.utils.tensorboard import SummaryWriter

        self._writer.close()
        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=keep_through + 1)

    def write(self, iteration: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, global_step=iteration)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """A Weights & Biases run holding the config and every metric at step = iteration."""

    def __init__(
        self,
        run_dir: Path,
        name: str,
        config: dict,
        *,
        project: str,
        entity: str | None,
        mode: str,
        tags: list[str],
    ):
        try:
            import wandb
        except ImportError:
            raise RuntimeError(
                "logging.wandb.enabled is on but wandb is not installed: pip install wandb, "
                "or set logging.wandb.enabled=false"
            ) from None
        self._run = wandb.init(
            project=project,
            entity=entity,
            name=name,
            dir=str(run_dir),
            mode=mode,
            config=config,
            tags=tags,
        )

    def write(self, iteration: int, metrics: dict[str, float]) -> None:
        self._run.log(metrics, step=iteration)

    def close(self) -> None:
        self._run.finish()


class MetricsLog:
    """Writes each iteration's metrics (to the JSON lines file and every sink) and shows
    progress over ``total`` iterations."""

    def __init__(
        self,
        run_dir: Path,
        total: int,
        *,
        progress_bar: bool = True,
        sinks: list[Sink] = (),
        keep_through: int | None = None,
    ):
        """``keep_through``: a resumed run keeps the records of iterations up to this one from
        an existing ``metrics.jsonl`` (later ones are recomputed) and drops the rest."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self.history: list[dict[str, float]] = []
        self._file = None
        self.sinks = list(sinks)
        if keep_through is not None:
            self.rewind(keep_through)
        self._file = self.path.open("a")
        done = sum("reward/score_mean" in r for r in self.history)
        self._bar = tqdm(
            total=total,
            initial=done,
            desc="iterations",
            disable=not (progress_bar and sys.stderr.isatty()),  # a file gets the lines only
            file=sys.stderr,
        )

    def rewind(self, keep_through: int) -> None:
        """Forget iterations after ``keep_through`` (the run went back to a checkpoint): in
        ``metrics.jsonl``, the history, and sinks that can (TensorBoard)."""
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        records = [json.loads(line) for line in lines if line.strip()]
        self.history = [r for r in records if r["iteration"] <= keep_through]
        if self._file is not None:
            self._file.close()
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        tmp.replace(self.path)
        if self._file is not None:
            self._file = self.path.open("a")
        for sink in self.sinks:
            if hasattr(sink, "rewind"):
                sink.rewind(keep_through)

    def log(self, iteration: int, metrics: dict[str, float]) -> None:
        """One iteration's metrics; a record without a training metric (``TRAINED``: the final
        evaluation) is written but does not advance the progress bar."""
        values = {k: float(v) for k, v in sorted(metrics.items())}
        record = {"iteration": iteration, **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for sink in self.sinks:
            sink.write(iteration, values)
        self.history.append(record)
        trained = next((k for k in TRAINED if k in record), None)
        if trained is None:
            self._bar.write(f"iter {iteration:4d} " + _eval_line(record))
            return
        line = " ".join(
            f"{short}={record[key]:.4g}" for key, short in HEADLINE.items() if key in record
        )
        self._bar.write(f"iter {iteration:4d} {line}")
        self._bar.set_postfix({HEADLINE[trained]: f"{record[trained]:.3f}"})
        self._bar.update(1)
        if any(k.startswith("eval/") for k in record):
            self._bar.write(f"iter {iteration:4d} " + _eval_line(record))

    def close(self) -> None:
        self._bar.close()
        self._file.close()
        for sink in self.sinks:
            sink.close()


def _eval_line(record: dict[str, float]) -> str:
    """``eval pass@1=0.44 pass@4=0.8 exact_integer=0.5 len=2.1``: pass@k first."""
    evals = {k.removeprefix("eval/"): v for k, v in record.items() if k.startswith("eval/")}
    passes = [k for k in evals if k.startswith("pass@")]
    means = [k for k in evals if k.endswith("/mean")]
    parts = [f"{k}={evals[k]:.4g}" for k in sorted(passes, key=lambda k: int(k[5:]))]
    parts += [f"{k.removesuffix('/mean')}={evals[k]:.4g}" for k in means]
    parts += [f"{k}={evals[k]:.4g}" for k in sorted(evals) if k.endswith(("_loss", "_accuracy"))]
    if "response_length" in evals:
        parts.append(f"len={evals['response_length']:.3g}")
    return "eval " + " ".join(parts)
