"""Every configuration key with its type, default and documentation, read from the config models.

    python -m orchestration.config_doc

The text is plain and pre-wrapped to 100 columns, so it can also close
``python -m orchestration.train --help`` (as the epilog, with ``RawDescriptionHelpFormatter``).
Keys are dotted as in overrides; the fields of a list's items read ``reward.functions[].name``.
Types and defaults are written as YAML, the language override values are parsed in (``null``
for None).
"""

from __future__ import annotations

import enum
import textwrap
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from orchestration.config import RunConfig

WIDTH = 100
INDENT = "    "
UNDOCUMENTED = "(undocumented)"
PREAMBLE = (
    "Configuration keys. Set them in a YAML file given to --config (nested sections) or as "
    "dotted key=value overrides; values are parsed as YAML (learner.lr=3e-4, "
    "logging.name=null, reward.functions=[{name: exact_integer}]). Defaults are the models' own; "
    "a preset may set others."
)


@dataclass(frozen=True)
class KeyDoc:
    """One configuration key as the documentation shows it."""

    name: str
    """Dotted name; a list's item fields read ``reward.functions[].name``."""
    type: str
    """The type as a user writes it: ``int``, ``float32 | bfloat16``, ``section | null``."""
    bounds: tuple[str, ...]
    """Numeric constraints, e.g. ``(">= 1",)``."""
    default: str | None
    """The default in YAML; None: the key is required. Empty for a section (see its keys)."""
    doc: str
    """The field's docstring (for a section without one, its model's); empty: undocumented."""
    depth: int
    """0 for a top-level key, 1 for a key of a top-level section, and so on."""
    field: str
    """Where the docstring is written: ``RoleResources.num_cpus``."""


# ------------------------------------------------------------------------------ reading models


def _strip_annotated(ann: Any) -> Any:
    return get_args(ann)[0] if get_origin(ann) is Annotated else ann


def _is_model(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _union_args(ann: Any) -> tuple:
    return get_args(ann) if get_origin(ann) in (Union, types.UnionType) else (ann,)


def _type_name(ann: Any) -> str:
    ann = _strip_annotated(ann)
    origin, args = get_origin(ann), get_args(ann)
    if ann is type(None):
        return "null"
    if ann is Any:
        return "any"
    if origin is Literal:
        return " | ".join(_yaml(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if isinstance(ann, type) and issubclass(ann, enum.Enum):
        return " | ".join(_yaml(m.value) for m in ann)
    if _is_model(ann):
        return "section"
    if origin in (list, tuple, set, frozenset):
        # A list of sections is a list of mappings whose keys follow as ``name[].key``.
        if args and _is_model(_strip_annotated(args[0])):
            return "list"
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args if a is not ...)}]"
    if origin is dict:
        return f"dict[{', '.join(_type_name(a) for a in args)}]" if args else "dict"
    return ann.__name__ if isinstance(ann, type) else str(ann)


def _yaml(value: Any) -> str:
    """A value as it would be written in YAML, on one line."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, float):
        return repr(value)  # 1e-06 rather than PyYAML's 1.0e-06
    if isinstance(value, BaseModel):
        # Inside a list default: the item's non-default fields are what tell it apart.
        value = value.model_dump(mode="json", exclude_defaults=True)
    elif isinstance(value, list | tuple):
        value = [
            v.model_dump(mode="json", exclude_defaults=True) if isinstance(v, BaseModel) else v
            for v in value
        ]
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), sort_keys=False)
    return text.strip().removesuffix("...").strip()


def _bounds(field: FieldInfo) -> tuple[str, ...]:
    out = []
    for constraint in field.metadata:
        for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            value = getattr(constraint, attr, None)
            if value is not None:
                out.append(f"{op} {value}")
    return tuple(out)


def _class_doc(ann: Any) -> str:
    """The docstring of the first model in ``ann`` (a model, ``X | None``, ``list[X]``)."""
    for arg in _union_args(_strip_annotated(ann)):
        arg = _strip_annotated(arg)
        candidates = [arg] + [_strip_annotated(a) for a in get_args(arg)]
        for c in candidates:
            # Not inspect.getdoc: it would hand down BaseModel's own docstring.
            if _is_model(c) and c.__dict__.get("__doc__"):
                return c.__dict__["__doc__"]
    return ""


def _nested(ann: Any) -> Iterator[tuple[str, type[BaseModel]]]:
    """(name suffix, model) for every model inside a field's type."""
    for arg in _union_args(_strip_annotated(ann)):
        arg = _strip_annotated(arg)
        origin, args = get_origin(arg), get_args(arg)
        if _is_model(arg):
            yield ".", arg
        elif origin in (list, tuple, set, frozenset) and args and _is_model(args[0]):
            yield "[].", args[0]
        elif origin is dict and len(args) == 2 and _is_model(_strip_annotated(args[1])):
            yield ".<key>.", _strip_annotated(args[1])


def _default(field: FieldInfo, value: Any, has_value: bool) -> str | None:
    if _is_model(_strip_annotated(field.annotation)):
        return ""  # a section: its keys carry the defaults
    if has_value:
        return _yaml(value)
    if field.is_required():
        return None
    return _yaml(field.get_default(call_default_factory=True, validated_data={}))


def iter_keys(
    model_cls: type[BaseModel] = RunConfig,
    prefix: str = "",
    defaults: BaseModel | None = None,
    depth: int = 0,
) -> Iterator[KeyDoc]:
    """Every key of ``model_cls``, depth first in declaration order.

    ``defaults`` is the instance a parent section holds as its default: its values, not the
    model's, are this section's defaults (``cluster.generator`` could differ from
    ``RoleResources()``).
    """
    for name, field in model_cls.model_fields.items():
        has_value = defaults is not None
        value = getattr(defaults, name) if has_value else None
        yield KeyDoc(
            name=prefix + name,
            type=_type_name(field.annotation),
            bounds=_bounds(field),
            default=_default(field, value, has_value),
            doc=field.description or _class_doc(field.annotation),
            depth=depth,
            field=f"{model_cls.__name__}.{name}",
        )
        if not has_value:
            value = field.get_default(call_default_factory=True, validated_data={})
        for suffix, nested in _nested(field.annotation):
            inner = value if suffix == "." and isinstance(value, nested) else None
            yield from iter_keys(nested, prefix + name + suffix, inner, depth + 1)


def undocumented(model_cls: type[BaseModel] = RunConfig) -> dict[str, list[str]]:
    """The fields without a docstring (``RoleResources.num_cpus``), each with the dotted keys
    it appears as (``cluster.generator.num_cpus``, ...)."""
    out: dict[str, list[str]] = {}
    for key in iter_keys(model_cls):
        if not key.doc.strip():
            out.setdefault(key.field, []).append(key.name)
    return out


# ------------------------------------------------------------------------------ rendering


def _paragraphs(text: str, indent: str, width: int) -> list[str]:
    out = []
    for para in text.strip().split("\n\n"):
        out += textwrap.wrap(
            " ".join(para.split()),
            width=width,
            initial_indent=indent,
            subsequent_indent=indent,
            break_long_words=False,
            break_on_hyphens=False,
        )
    return out


def _key_lines(key: KeyDoc, width: int) -> list[str]:
    parts = [key.type, *key.bounds]
    if key.default is None:
        parts.append("required")
    elif key.default:
        parts.append(f"default: {key.default}")
    head = textwrap.wrap(
        f"{key.name}  ({', '.join(parts)})",
        width=width,
        subsequent_indent=INDENT * 2,
        break_long_words=False,
        break_on_hyphens=False,
    )
    return head + _paragraphs(key.doc or UNDOCUMENTED, INDENT, width)


def describe_config(model_cls: type[BaseModel] = RunConfig, width: int = WIDTH) -> str:
    """Every key of the config tree: dotted name, type, bounds, default and docstring.

    Grouped by top-level section (the top-level scalars first, under "top level"), each section
    headed by its name and documentation, and wrapped to ``width`` columns.
    """
    groups: list[list[KeyDoc]] = []  # a top-level key, then the keys under it
    for key in iter_keys(model_cls):
        if key.depth == 0:
            groups.append([key])
        else:
            groups[-1].append(key)
    lines = _paragraphs(PREAMBLE, "", width)
    scalars = [g[0] for g in groups if len(g) == 1 and g[0].type != "section"]
    if scalars:
        lines += ["", "top level", "---------"]
        for key in scalars:
            lines += _key_lines(key, width)
    for head, *keys in (g for g in groups if g[0] not in scalars):
        lines += ["", head.name, "-" * len(head.name)]
        if head.type == "section":
            lines += _paragraphs(head.doc, "", width) if head.doc else []
        else:  # a list or an optional section has a type and default of its own
            lines += _key_lines(head, width)
        for key in keys:
            lines += _key_lines(key, width)
    return "\n".join(lines) + "\n"


def main() -> None:
    """Print the reference (``python -m orchestration.config_doc``)."""
    print(describe_config(), end="")


if __name__ == "__main__":
    main()
