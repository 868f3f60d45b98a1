"""Drawing prompts: batches in seeded passes over the prompt set, and the whole set at once.

The prompt set itself (reading, tokenizing, checking each row) is ``orchestration.data``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sized

import numpy as np
import pyarrow as pa

from orchestration.data import PromptSet
from rollout import schema as S


class PromptSampler:
    """Draws prompt batches in passes (epochs) over the prompt set, each pass in a new order.

    The order of epoch ``e`` is a pure function of ``(seed, e, len(prompts))``, so the position
    (``state_dict``) is all a resumed run needs; nothing is replayed. ``prompt_id`` counts draws
    over the run, so it is unique even when a prompt comes twice in a batch; ``dataset_row`` says
    which prompt (index into the ``PromptSet``) it was.
    """

    def __init__(self, prompts: PromptSet | Sized, seed: int, *, shuffle: bool = True):
        if not len(prompts):
            raise ValueError("PromptSampler needs at least one prompt")
        self.prompts, self.seed, self.shuffle = prompts, seed, shuffle
        self.epoch = 0
        self.position = 0  # draws into the current epoch, always < len(prompts)
        self.drawn = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.prompts))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))

    @property
    def progress(self) -> float:
        """Epochs drawn, fractional: ``epoch + position / len(prompts)``."""
        return self.epoch + self.position / len(self.prompts)

    def next_rows(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """The next ``size`` draws: ``(ids, rows)``, the draws' run-wide ids (``prompt_id``) and
        the indices into the set they drew. The set may be any sized collection (the
        supervised stages draw their examples this way)."""
        if size < 0:
            raise ValueError(f"batch size {size} < 0")
        parts, need = [], size
        while need > 0:
            part = self._order[self.position : self.position + need]
            parts.append(part)
            need, self.position = need - len(part), self.position + len(part)
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
        rows = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        ids = np.arange(self.drawn, self.drawn + size, dtype=np.int64)
        self.drawn += size
        return ids, rows

    def next_batch(self, size: int) -> pa.Table:
        """The next ``size`` prompts: prompt_id, prompt_token_ids, label, dataset_row."""
        ids, rows = self.next_rows(size)
        return pa.table(
            {
                S.PROMPT_ID: pa.array(ids),
                S.PROMPT_TOKEN_IDS: pa.array(
                    [self.prompts.token_ids[r] for r in rows], S.TOKEN_IDS_TYPE
                ),
                "label": pa.array([self.prompts.labels[r] for r in rows], pa.string()),
                "dataset_row": pa.array(rows, pa.int64()),
            }
        )

    def state_dict(self) -> dict[str, int]:
        """Where the sampler is: ``epoch``, ``position``, ``drawn`` and ``seed``."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "drawn": self.drawn,
            "seed": self.seed,
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from ``state``: the next batches are those the saved sampler would draw.

        Raises:
            ValueError: a state with missing keys, another seed, a position outside the prompt
                set, or counts that disagree with this prompt set's size.
        """
        missing = {"epoch", "position", "drawn", "seed"} - set(state)
        if missing:
            raise ValueError(f"sampler state lacks {sorted(missing)}")
        if state["seed"] != self.seed:
            raise ValueError(f"sampler state has seed {state['seed']}, this sampler {self.seed}")
        n = len(self.prompts)
        epoch, position, drawn = int(state["epoch"]), int(state["position"]), int(state["drawn"])
        if not 0 <= position < n:
            raise ValueError(f"sampler state position {position} is outside 0..{n - 1}")
        # Every draw advances the position, so a state from a prompt set of another size
        # (a changed dataset) almost always fails this.
        if epoch < 0 or drawn != epoch * n + position:
            raise ValueError(
                f"sampler state (epoch {epoch}, position {position}, drawn {drawn}) does not fit "
                f"a prompt set of {n} prompts; was the dataset changed?"
            )
        self.epoch, self.position, self.drawn = epoch, position, drawn
        self._order = self._epoch_order(epoch)


def all_prompts(prompts: PromptSet) -> pa.Table:
    """Every prompt once, in dataset order (``prompt_id == dataset_row``): the input of a pass
    over the whole dataset, such as the reference baselines."""
    rows = np.arange(len(prompts), dtype=np.int64)
    return pa.table(
        {
            S.PROMPT_ID: pa.array(rows),
            S.PROMPT_TOKEN_IDS: pa.array(prompts.token_ids, S.TOKEN_IDS_TYPE),
            "label": pa.array(prompts.labels, pa.string()),
            "dataset_row": pa.array(rows),
        }
    )
