"""Reward functions that misbehave, as users' functions do (kept free of heavy imports: the
contained child imports this module)."""

from __future__ import annotations

import os
import time


def high(prompt, response, label):
    return "high"


def nan_or_one(prompt, response, label):
    return float("nan") if response == "nan" else 1


def raises_on_bad(prompt, response, label):
    if response == "bad":
        raise ValueError(f"cannot judge {response!r}")
    return 0.5


def hangs_on_slow(prompt, response, label):
    if response == "slow":
        while True:  # no sleep: busy, as a runaway regex or loop would be
            pass
    return 1.0


def always_hangs(prompt, response, label):
    time.sleep(3600)


def exits_on_crash(prompt, response, label):
    if response == "crash":
        os._exit(7)
    return 0.25


def numpy_and_bool(prompt, response, label):
    import numpy as np

    return np.float32(0.5) if response == "np" else True


def always_raises(prompt, response, label):
    raise ValueError(f"no verdict for {label!r}")
