"""Rule-based reward functions (verifiers) and the registry the config names them from.

A reward function takes the decoded prompt, the decoded response and the row's label and returns
a float, or ``None`` when it cannot judge the sample (no label, say). ``None`` makes the sample
unscorable: it gets no advantage, never a silent 0. Functions with settings take them as
keyword-only parameters with defaults, bound by ``resolve(name, params)``. The built-ins live
in ``reward_service.verifiers`` (math, multiple choice, regex, length) and
``reward_service.code_verifier`` (running code against tests).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from reward_service.code_verifier import code_tests
from reward_service.verifiers import length_in_range, math_answer, multiple_choice, regex_match


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
    "math_answer": math_answer,
    "multiple_choice": multiple_choice,
    "regex_match": regex_match,
    "length_in_range": length_in_range,
    "code_tests": code_tests,
}
"""Built-in functions by name. A config may also name any ``package.module:function``."""


def resolve(name: str, params: Mapping[str, Any] | None = None) -> RewardFunction:
    """The reward function called ``name`` (a built-in, or ``package.module:function``) with
    ``params`` bound: ``functools.partial(fn, **params)``, or ``fn`` itself without params.

    Every param must be a keyword-only parameter of the function (any name, if it takes
    ``**kwargs``), and every keyword-only parameter without a default must be given. A
    built-in is then called once on an empty, label-less sample: built-ins check their params
    before they look at the sample, so a bad value (a regex that does not compile, an unknown
    answer style) fails here, not on the first rollout.

    Raises:
        ValueError: unknown built-in, an import path that does not lead to a callable, an
            unknown or missing param (the message lists the accepted ones), or a bad value.
    """
    fn = _lookup(name)
    params = dict(params or {})
    _check_params(name, fn, params)
    if not params:
        return fn
    bound = functools.partial(fn, **params)
    if name in REWARD_FUNCTIONS:
        try:
            bound("", "", None)
        except ValueError as e:
            raise ValueError(f"reward function {name!r}: {e}") from e
    return bound


def _lookup(name: str) -> RewardFunction:
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


def _check_params(name: str, fn: RewardFunction, params: dict[str, Any]) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as e:  # some builtins and C callables have none
        if params:
            raise ValueError(f"reward function {name!r} has no signature to bind params to") from e
        return
    kinds = {p.name: p for p in signature.parameters.values()}
    keyword_only = [p.name for p in kinds.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in kinds.values())
    unknown = sorted(set(params) - set(keyword_only))
    if unknown and not takes_any:
        accepted = ", ".join(keyword_only) or "none"
        raise ValueError(
            f"reward function {name!r} got unknown params {unknown}; it accepts: {accepted}"
        )
    missing = [
        p for p in keyword_only if kinds[p].default is inspect.Parameter.empty and p not in params
    ]
    if missing:
        raise ValueError(f"reward function {name!r} needs the params {missing}")
