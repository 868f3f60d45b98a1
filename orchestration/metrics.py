"""Per-iteration metrics: a JSON line each in ``<run_dir>/metrics.jsonl``, a printed line, a
progress bar, and stage timers."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

# The few metrics a person reads first, in this order, with short names for the printed line.
HEADLINE = {
    "reward/score_mean": "reward",
    "actor/kl_ref": "kl",
    "actor/entropy": "entropy",
    "actor/clipfrac": "clipfrac",
    "rollout/response_length": "len",
    "rollout/logprob_mismatch": "mismatch",
    "timing/iteration": "s/it",
}


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


class MetricsLog:
    """Writes each iteration's metrics and shows progress over ``total`` iterations."""

    def __init__(self, run_dir: Path, total: int, *, progress_bar: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = self.path.open("a")
        self._bar = tqdm(total=total, desc="iterations", disable=not progress_bar, file=sys.stderr)
        self.history: list[dict[str, float]] = []

    def log(self, iteration: int, metrics: dict[str, float]) -> None:
        record = {"iteration": iteration, **{k: float(v) for k, v in sorted(metrics.items())}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.history.append(record)
        line = " ".join(
            f"{short}={record[key]:.4g}" for key, short in HEADLINE.items() if key in record
        )
        self._bar.write(f"iter {iteration:4d} {line}")
        self._bar.set_postfix(reward=f"{record.get('reward/score_mean', float('nan')):.3f}")
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()
        self._file.close()
