"""Rule-based reward functions (verifiers) and the registry the config names them from.

A reward function takes the decoded prompt, the decoded response and the row's label and returns
a float, or ``None`` when it cannot judge the sample (no label, say). ``None`` makes the sample
unscorable: it gets no advantage, never a silent 0.
"""

from __future__ import annotations

import importlib
import re
from typing import Protocol, runtime_checkable


@runtime_checkable
class RewardFunction(Protocol):
    """``(prompt, response, label) -> float | None``; ``None`` means unscorable."""

    def __call__(self, prompt: str, response: str, label: str | None) -> float | None: ...


_INTEGER = re.compile(r"[+-]?\d+")


def exact_integer(prompt: str, response: str, label: str | None) -> float | None:
    """The RFT/ReFT verifier for integer answers: 1 for the right answer, 0.1 for a wrong
    integer, 0 when the response is not an integer (after stripping whitespace).

    Unscorable (``None``) when the label is missing or is not an integer itself.
    """
    if label is None or not _INTEGER.fullmatch(label.strip()):
        return None
    answer = response.strip()
    if not _INTEGER.fullmatch(answer):
        return 0.0
    return 1.0 if int(answer) == int(label) else 0.1


REWARD_FUNCTIONS: dict[str, RewardFunction] = {
    "exact_integer": exact_integer,
}
"""Built-in functions by name. A config may also name any ``package.module:function``."""


def resolve(name: str) -> RewardFunction:
    """The reward function called ``name``: a built-in, or ``package.module:function``.

    Raises:
        ValueError: unknown built-in, or an import path that does not lead to a callable.
    """
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    if ":" not in name:
        known = ", ".join(sorted(REWARD_FUNCTIONS))
        raise ValueError(
            f"unknown reward function {name!r}; use a built-in ({known}) "
            "or an import path 'package.module:function'"
        )
    module_name, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward function {name!r} cannot be imported: {e}") from e
    if not callable(fn):
        raise ValueError(f"reward function {name!r} is not callable")
    return fn
