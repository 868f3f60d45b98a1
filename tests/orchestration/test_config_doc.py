"""The config reference: every key documented, types and defaults as a user writes them."""

from __future__ import annotations

import enum
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from orchestration.config import RunConfig
from orchestration.config_doc import (
    UNDOCUMENTED,
    WIDTH,
    describe_config,
    iter_keys,
    main,
    undocumented,
)

pytestmark = pytest.mark.unit  # pure code in this process


def test_every_config_key_has_a_docstring():
    missing = undocumented(RunConfig)
    lines = [f"{field}  ({', '.join(keys)})" for field, keys in missing.items()]
    assert not missing, (
        f"{len(missing)} config fields have no docstring (write one under each in "
        "orchestration/config_sections.py, RunConfig's in config.py):\n  " + "\n  ".join(lines)
    )


def test_known_keys_appear_with_their_type_default_and_doc():
    text = describe_config()
    expected = [
        "data.source  (str, default: builtin:addition)\n    Prompts: ``builtin:addition``",
        "data.prompts_per_iteration  (int, >= 1, default: 16)\n    Prompts drawn per iteration",
        "model.dtype  (float32 | bfloat16, default: float32)\n    Weights dtype",
        "algorithm.estimator  (gae | grpo | dr_grpo | rloo | reinforce_pp, default: grpo)",
        "algorithm.kl_estimator  (k1 | k2 | k3 | null, default: null)",
        "generator.gpu_memory_utilization  (float, > 0, <= 0.95, default: 0.5)",
        "reward.functions  (list, default: [{name: exact_integer}])\n    Rule reward functions",
        "reward.functions[].name  (str, required)\n    A built-in reward function",
        "reward.models[].resources  (section | null, default: null)",
        "reward.models[].resources.num_gpus  (float, >= 0, default: 0)",
        "reward.overlong.buffer_tokens  (int, >= 1, required)",
        "cluster.generator.resources  (dict[str, float], default: {})\n    Custom Ray resources",
        "logging.name  (str | null, default: null)\n    Run directory name",
    ]
    for snippet in expected:
        assert snippet in text, snippet
    for heading in ("top level", "data", "reward", "cluster", "logging"):
        assert f"\n\n{heading}\n{'-' * len(heading)}\n" in text


def test_every_key_is_listed_once_and_lines_fit_the_terminal():
    text = describe_config()
    heads = [line.split("  (")[0] for line in text.splitlines() if not line.startswith(" ")]
    # Top-level sections are headings rather than key lines.
    names = [k.name for k in iter_keys(RunConfig) if k.depth or k.type != "section"]
    assert [h for h in heads if h in names] == names
    assert max(len(line) for line in text.splitlines()) <= WIDTH


def test_module_prints_the_reference(capsys):
    main()
    assert capsys.readouterr().out == describe_config()


# ------------------------------------------------------------------------------ the renderer


class Color(str, enum.Enum):
    RED = "red"
    BLUE = "blue"


class Leaf(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)

    size: int = Field(1, ge=1)
    """How big."""
    note: str


class Tree(BaseModel):
    """A tree for the renderer's tests."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    color: Color = Color.RED
    """Its color."""
    mode: Literal["a", "b"] | None = None
    leaf: Leaf = Leaf(size=5, note="x")
    """A leaf whose defaults differ from Leaf's."""
    leaves: list[Leaf] = []
    """Several."""
    named: dict[str, Leaf] = {}
    """By name."""
    spare: Leaf | None = None
    """Maybe one."""


def test_renderer_covers_enums_literals_nested_lists_dicts_and_optionals():
    keys = {k.name: k for k in iter_keys(Tree)}
    assert keys["color"].type == "red | blue" and keys["color"].default == "red"
    assert keys["mode"].type == "a | b | null" and keys["mode"].doc == ""
    # A section default's own values are its keys' defaults.
    assert keys["leaf.size"].default == "5" and keys["leaf.note"].default == "x"
    assert keys["leaves[].size"].default == "1" and keys["leaves[].note"].default is None
    assert keys["named.<key>.size"].bounds == (">= 1",)
    assert keys["spare"].type == "section | null" and "spare.note" in keys
    assert undocumented(Tree) == {
        "Tree.mode": ["mode"],
        "Leaf.note": ["leaf.note", "leaves[].note", "named.<key>.note", "spare.note"],
    }
    text = describe_config(Tree)
    assert f"mode  (a | b | null, default: null)\n    {UNDOCUMENTED}" in text
    assert "leaves[].note  (str, required)" in text
