"""The project's own source against the rules in SECURITY.md (fast: parses files, starts nothing).

Every ``.py`` file of the repository outside ``tests/``, virtual environments, run outputs and
hidden directories is parsed with ``ast`` (a call split over several lines is seen whole, and
comments or strings never match), and every ``.yaml``/``.yml`` file is read as text. Rules:

1. ``torch-load``: ``torch.load(...)`` without ``weights_only=True`` (unpickling runs code).
2. ``trust-remote-code``: remote code turned on by a literal: ``trust_remote_code=True`` in a
   call, ``True`` as the default of a parameter, field or variable of that name, a dict entry
   ``"trust_remote_code": True``, or ``trust_remote_code: true`` / ``=true`` in YAML.
3. ``ray-timeout``: ``ray.get(...)`` / ``ray.wait(...)`` without ``timeout=`` (or with
   ``timeout=None``): such a call waits forever on a hung or lost actor.
4. ``http-timeout``: an HTTP call without ``timeout=``: the functions of ``requests`` and
   ``httpx``, ``urllib.request.urlopen``, and the request methods of an object named
   ``session``/``_session``/``*_session``.

Imports are followed (``import ray as r``, ``from torch import load``). A call passing
``**kwargs`` counts as not passing the keyword: name it explicitly.

``ALLOWED`` lists the offenders known when this test was written, by file, rule and code (not by
line, so edits around them do not matter). Empty it as they are fixed: an entry that no longer
matches anything fails ``test_every_allowed_offender_still_exists``.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit  # pure code in this process

REPO = Path(__file__).resolve().parents[1]
SKIP_DIRS = {"tests", "runs", "build", "dist", "node_modules", "__pycache__"}
RULES = ("torch-load", "trust-remote-code", "ray-timeout", "http-timeout")
HTTP_FUNCTIONS = {
    f"{module}.{verb}"
    for module in ("requests", "httpx")
    for verb in ("get", "post", "put", "patch", "delete", "head", "options", "request", "stream")
} | {"urllib.request.urlopen"}
SESSION_METHODS = {"get", "post", "put", "patch", "delete", "head", "options", "request"}
SESSION_NAME = re.compile(r"(^|_)session$", re.IGNORECASE)
YAML_TRUST = re.compile(r"trust_remote_code\s*[:=]\s*['\"]?true\b", re.IGNORECASE)

# Known offenders: (path, rule, code with whitespace collapsed). Remove each once fixed.
ALLOWED: set[tuple[str, str, str]] = set()


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    rule: str
    code: str

    @property
    def key(self) -> tuple[str, str, str]:
        return self.path, self.rule, self.code

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.rule}: {self.code}"


# ------------------------------------------------------------------------------ scanning


def _imports(tree: ast.AST) -> dict[str, str]:
    """Local name -> the dotted name it stands for, from every import in the module."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    names[a.asname] = a.name
                else:
                    top = a.name.split(".")[0]
                    names[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.AST, imports: dict[str, str]) -> str | None:
    """``ray.get`` for the expression ``ray.get`` (imports resolved), None if not a plain name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(imports.get(node.id, node.id))
    return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _has_timeout(call: ast.Call) -> bool:
    value = _keyword(call, "timeout")
    return value is not None and not (isinstance(value, ast.Constant) and value.value is None)


def _turns_on_remote_code(node: ast.AST) -> bool:
    """A ``trust_remote_code`` default, field, assignment or dict entry set to a literal True."""
    if isinstance(node, ast.Call):
        return _is_true(_keyword(node, "trust_remote_code"))
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        a = node.args
        positional = [*a.posonlyargs, *a.args]
        pairs = list(zip(positional[len(positional) - len(a.defaults) :], a.defaults, strict=True))
        pairs += list(zip(a.kwonlyargs, a.kw_defaults, strict=True))
        return any(arg.arg == "trust_remote_code" and _is_true(d) for arg, d in pairs)
    if isinstance(node, (ast.AnnAssign, ast.Assign)):
        targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
        named = any(
            getattr(t, "id", None) == "trust_remote_code"
            or getattr(t, "attr", None) == "trust_remote_code"
            for t in targets
        )
        value = node.value
        if isinstance(value, ast.Call):  # Field(True, ...) / Field(default=True)
            value = _keyword(value, "default") or (value.args[0] if value.args else None)
        return named and _is_true(value)
    if isinstance(node, ast.Dict):
        return any(
            isinstance(k, ast.Constant) and k.value == "trust_remote_code" and _is_true(v)
            for k, v in zip(node.keys, node.values, strict=True)
        )
    return False


def scan_python(source: str, path: str) -> list[Finding]:
    """Every rule's offenders in one module's source."""
    tree = ast.parse(source, filename=path)
    imports = _imports(tree)
    found = []

    def add(node: ast.AST, rule: str) -> None:
        segment = ast.get_source_segment(source, node) or ""
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            segment = segment.split(":\n", 1)[0]  # the signature, not the body
        found.append(Finding(path, node.lineno, rule, " ".join(segment.split())))

    for node in ast.walk(tree):
        if _turns_on_remote_code(node):
            add(node, "trust-remote-code")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, imports)
        if name in ("torch.load", "torch.serialization.load"):
            if not _is_true(_keyword(node, "weights_only")):
                add(node, "torch-load")
        elif name in ("ray.get", "ray.wait"):
            if not _has_timeout(node):
                add(node, "ray-timeout")
        elif name in HTTP_FUNCTIONS or _is_session_call(node.func):
            if not _has_timeout(node):
                add(node, "http-timeout")
    return found


def _is_session_call(func: ast.AST) -> bool:
    if not (isinstance(func, ast.Attribute) and func.attr in SESSION_METHODS):
        return False
    receiver = func.value
    name = receiver.attr if isinstance(receiver, ast.Attribute) else getattr(receiver, "id", "")
    return bool(SESSION_NAME.search(name))


def scan_yaml(text: str, path: str) -> list[Finding]:
    return [
        Finding(path, i, "trust-remote-code", line.strip())
        for i, line in enumerate(text.splitlines(), start=1)
        if YAML_TRUST.search(line) and not line.lstrip().startswith("#")
    ]


def project_files(root: Path = REPO) -> list[Path]:
    """The repository's own ``.py`` and YAML files (not tests, environments, outputs, hidden)."""
    out = []
    stack = [root]
    while stack:
        directory = stack.pop()
        for entry in sorted(directory.iterdir()):
            if entry.is_dir():
                skip = (
                    entry.name.startswith(".")
                    or entry.name in SKIP_DIRS
                    or entry.name.endswith(".egg-info")
                    or (entry / "pyvenv.cfg").exists()
                )
                if not skip:
                    stack.append(entry)
            elif entry.suffix in (".py", ".yaml", ".yml"):
                out.append(entry)
    return out


def audit(root: Path = REPO) -> list[Finding]:
    found = []
    for file in project_files(root):
        rel = file.relative_to(root).as_posix()
        text = file.read_text(encoding="utf-8")
        found += scan_python(text, rel) if file.suffix == ".py" else scan_yaml(text, rel)
    return found


# ------------------------------------------------------------------------------ the audit


@pytest.fixture(scope="module")
def findings() -> list[Finding]:
    return audit()


def test_the_audit_reads_the_packages_and_not_the_tests():
    files = {f.relative_to(REPO).as_posix() for f in project_files()}
    for expected in ("orchestration/loop.py", "learner/checkpoint.py", "deploy/runtime_env.yaml"):
        assert expected in files
    assert not any(f.startswith(("tests/", ".venv/")) for f in files)


@pytest.mark.parametrize("rule", RULES)
def test_no_offender_outside_the_allowlist(findings, rule):
    new = [f for f in findings if f.rule == rule and f.key not in ALLOWED]
    assert not new, f"{len(new)} {rule} offender(s) (see SECURITY.md):\n" + "\n".join(map(str, new))


def test_every_allowed_offender_still_exists(findings):
    stale = ALLOWED - {f.key for f in findings}
    assert not stale, f"fixed, so remove from ALLOWED in {Path(__file__).name}: {sorted(stale)}"


# ------------------------------------------------------------------------------ the scanner


@pytest.mark.parametrize(
    ("source", "rules"),
    [
        ("import ray\nray.get(refs)\n", ["ray-timeout"]),
        ("import ray\nray.get(\n    refs,\n    timeout=t,\n)\n", []),  # multi-line call
        ("import ray\nray.get(refs, timeout=None)\n", ["ray-timeout"]),
        ("import ray as r\nd, p = r.wait(refs, num_returns=2)\n", ["ray-timeout"]),
        ("from ray import get\nget(ref)\n", ["ray-timeout"]),
        ("import ray\nray.get(refs, **kw)\n", ["ray-timeout"]),
        ("# ray.get(refs)\nx = 'ray.get(refs)'\n", []),  # comments and strings
        ("import torch\ntorch.load(p)\n", ["torch-load"]),
        (
            "import torch\ntorch.load(\n    p, map_location='cpu', weights_only=False\n)\n",
            ["torch-load"],
        ),
        ("import torch\ntorch.load(p, weights_only=True)\n", []),
        ("from torch import load\nload(p)\n", ["torch-load"]),
        ("def f(path, trust_remote_code: bool = True): ...\n", ["trust-remote-code"]),
        ("def f(path, *, trust_remote_code=False): ...\n", []),
        ("class C:\n    trust_remote_code: bool = True\n", ["trust-remote-code"]),
        ("class C:\n    trust_remote_code: bool = Field(True)\n", ["trust-remote-code"]),
        ("m = load(p,\n  trust_remote_code=True)\n", ["trust-remote-code"]),
        ("kw = {'trust_remote_code': True}\n", ["trust-remote-code"]),
        ("m = load(p, trust_remote_code=cfg.trust)\n", []),
        ("import requests\nrequests.post(url, json=body)\n", ["http-timeout"]),
        ("import requests\nrequests.get(url, timeout=(3, 30))\n", []),
        ("from urllib.request import urlopen\nurlopen(url)\n", ["http-timeout"]),
        ("self._session.post(url, json=body, allow_redirects=False)\n", ["http-timeout"]),
        ("session.get(url, timeout=2.0)\n", []),
        ("settings.get('key')\n", []),
    ],
)
def test_the_scanner_finds_what_each_rule_names(source, rules):
    assert [f.rule for f in scan_python(source, "x.py")] == rules


def test_yaml_that_turns_on_remote_code_is_found():
    text = (
        "model:\n  trust_remote_code: true\n"
        "# trust_remote_code: true\n"
        "entrypoint: python -m orchestration.train model.trust_remote_code=True\n"
    )
    assert [(f.line, f.rule) for f in scan_yaml(text, "x.yaml")] == [
        (2, "trust-remote-code"),
        (4, "trust-remote-code"),
    ]
    assert scan_yaml("model:\n  trust_remote_code: false\n", "x.yaml") == []
