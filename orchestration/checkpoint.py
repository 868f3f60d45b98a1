"""Run checkpoints: everything a run needs to continue exactly where it was.

``<run_dir>/checkpoints/iter_<k>/`` after iteration k::

    learner/     every learner rank's DeepSpeed state and RNGs (``learner.checkpoint``)
    driver.json  iteration, weight version, KL controller, reward shaper (running statistics,
                 baselines), data sampler position, generation seed counter, driver RNGs
    config.yaml  the run's config
    COMMITTED    written last: a directory without it is an interrupted write, never read

A checkpoint is written into its directory in place and committed by the marker; ``resume=auto``
takes the newest committed one. Learner ranks write their own files, so on several nodes the
run directory must be on storage every node shares (as for ``policy/``).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from learner.checkpoint import write_json

MARKER = "COMMITTED"

# Config fields a resumed run may change: how long it runs, where it logs, what it evaluates and
# exports, how often it checkpoints, and operational limits. Everything else must match the
# checkpoint (the model, data, algorithm, learner and reward), or the run is not the same run.
MAY_CHANGE = (
    "iterations",
    "resume",
    "logging.",
    "eval.",
    "export.",
    "checkpoint.",
    "cluster.address",
    "cluster.call_timeout_s",
    "cluster.placement_timeout_s",
    "cluster.max_failures",
    "cluster.max_actor_restarts",
    "cluster.torch_threads",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (missing, uncommitted, or from another config)."""


def directory(run_dir: Path, iteration: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"iter_{iteration:06d}"


def committed(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def find_latest(run_dir: Path) -> tuple[Path | None, list[Path]]:
    """The newest committed checkpoint under ``run_dir`` (or None) and the uncommitted
    directories newer than it (interrupted writes, ignored)."""
    root = Path(run_dir) / "checkpoints"
    candidates = sorted(root.glob("iter_*[0-9]")) if root.is_dir() else []
    ignored = []
    for path in reversed(candidates):
        if committed(path):
            return path, ignored
        ignored.append(path)
    return None, ignored


def _flatten(tree, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out |= _flatten(v, f"{prefix}{k}.")
        return out
    return {prefix[:-1]: tree}


def config_differences(saved: dict, current: dict) -> list[str]:
    """``key: saved -> current`` for every field that differs and may not."""
    a, b = _flatten(saved), _flatten(current)
    out = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(MAY_CHANGE) or key in MAY_CHANGE:
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return out


def check_compatible(path: Path, current: dict) -> dict:
    """The checkpoint's driver state, after checking it was written by this run's config.

    Raises:
        CheckpointError: not committed, or its config differs where a resumed run may not.
    """
    path = Path(path)
    if not committed(path):
        raise CheckpointError(
            f"checkpoint {path} is not committed (no {MARKER} marker: its write was "
            "interrupted); use resume=auto to take the newest committed one"
        )
    saved = yaml.safe_load((path / "config.yaml").read_text())
    diffs = config_differences(saved, current)
    cosine = current.get("learner", {}).get("lr_schedule") == "cosine"
    if cosine and saved.get("iterations") != current.get("iterations"):
        diffs.append(
            f"iterations: {saved.get('iterations')!r} -> {current.get('iterations')!r} (the cosine "
            "learning-rate schedule is laid over the run's length)"
        )
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was written with a different config:\n  "
            + "\n  ".join(diffs)
            + "\nresume with the checkpoint's values, or start a new run (another logging.name)"
        )
    return json.loads((path / "driver.json").read_text())


def rng_states() -> dict:
    version, state, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return {
        "python": [version, list(state), gauss],
        "numpy": {
            **np_state,
            "state": {
                k: v.tolist() if hasattr(v, "tolist") else v for k, v in np_state["state"].items()
            },
        },
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_states(state: dict) -> None:
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def save(
    run_dir: Path,
    iteration: int,
    driver_state: dict,
    config: dict,
    learners: list,
    timeout: float,
    tables: dict | None = None,
) -> Path:
    """Write checkpoint ``iteration`` (learner ranks first, the driver's state, the config, and
    ``tables``: name -> Arrow table, as ``<name>.parquet``) and commit it. Returns its
    directory."""
    import ray

    from orchestration import calls

    path = directory(run_dir, iteration)
    if path.exists():  # an interrupted write of the same iteration
        shutil.rmtree(path)
    path.mkdir(parents=True)
    start = time.perf_counter()
    refs = [a.save_checkpoint.remote(str(path / "learner")) for a in learners]
    done, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    if pending:
        raise TimeoutError(
            f"checkpoint: learner ranks did not save within cluster.call_timeout_s={timeout:g}"
        )
    calls.wait(done, "checkpoint", timeout)
    (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if tables:
        import pyarrow.parquet as pq

        for name, table in tables.items():
            pq.write_table(table, path / f"{name}.parquet")
    write_json(path / "driver.json", driver_state | {"iteration": iteration})
    write_json(path / MARKER, {"iteration": iteration, "seconds": time.perf_counter() - start})
    return path


def pending_generations(path: Path) -> list:
    """The generations that were running ahead of training when checkpoint ``path`` was
    written (``pending_<j>.parquet``, oldest first; none in a synchronous run), as
    ``GeneratorPool.submit`` results that hold their table."""
    import pyarrow.parquet as pq

    from orchestration.generators import Submitted

    files = sorted(Path(path).glob("pending_*.parquet"), key=lambda f: int(f.stem.split("_")[1]))
    return [Submitted(None, None, [], [], -1, table=pq.read_table(f)) for f in files]


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` committed checkpoints; delete older ones and interrupted writes
    older than the newest committed one."""
    root = Path(run_dir) / "checkpoints"
    paths = sorted(root.glob("iter_*[0-9]"))
    good = [p for p in paths if committed(p)]
    for old in good[:-keep]:
        shutil.rmtree(old)
    if good:
        for p in paths:
            if not committed(p) and p < good[-1]:
                shutil.rmtree(p, ignore_errors=True)
