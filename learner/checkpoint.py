"""The learner's part of a run checkpoint: DeepSpeed engine state plus each rank's own state.

DeepSpeed writes the engine state (weights, optimizer, scheduler; partitioned as ZeRO keeps them)
with ``engine.save_checkpoint``. Its stock loader unpickles with ``torch.load(weights_only=False)``,
which runs arbitrary code from a crafted file; :class:`SafeLoadEngine` replaces it with
``weights_only=True`` and an allowlist of the few non-tensor types DeepSpeed stores. Each rank's
RNG states and counters go to ``rank_<r>.json``.

Layout under the checkpoint's ``learner/`` directory::

    policy/state/...    DeepSpeed files of the policy engine
    critic/state/...    and of the critic (PPO)
    rank_<r>.json       numpy and torch RNG states, skipped-step counters, world size
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

TAG = "state"


def _safe_globals() -> list:
    """Non-tensor types in DeepSpeed's checkpoint files (found by loading real ones)."""
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    found = [ZeroStageEnum, fragment_address]
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler

        found.append(LossScaler)
    except ImportError:
        pass
    return found


def safe_load_engine(replaced=None):
    """A DeepSpeed checkpoint engine whose loads are ``weights_only=True``; it saves as the
    engine it replaces did (zip or legacy format)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeLoadEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    engine = SafeLoadEngine()
    engine.zipfile_serialization = getattr(replaced, "zipfile_serialization", False)
    return engine


def write_json(path: Path, data: dict) -> None:
    """``data`` as JSON at ``path``, written beside it, flushed to disk and renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_engine(engine, directory: Path) -> None:
    """Every rank calls it (each writes its own optimizer partition)."""
    engine.save_checkpoint(str(directory), tag=TAG, save_latest=False)


def load_engine(engine, directory: Path) -> None:
    if not (directory / TAG).is_dir():
        raise FileNotFoundError(f"no DeepSpeed state at {directory / TAG}")
    engine.checkpoint_engine = safe_load_engine(engine.checkpoint_engine)
    path, _ = engine.load_checkpoint(
        str(directory), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint at {directory / TAG}")


def rng_state(numpy_rng) -> dict:
    return {
        "numpy": numpy_rng.bit_generator.state,
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(numpy_rng, state: dict) -> None:
    numpy_rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
