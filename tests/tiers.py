"""The test tiers, as pytest hooks (``tests/conftest.py`` imports them).

Every test carries exactly one tier marker; a whole run runs the tiers in this order, so a
broken formula fails in the first seconds, and ends with a line per tier::

    pytest -m unit        # pure code in this process: torch, pyarrow, numpy, the tiny tokenizer
    pytest -m component   # DeepSpeed on gloo, an in-process vLLM engine, child processes
    pytest -m slow        # Ray end to end: the entry point, actors, simulated clusters
    pytest -m gpu         # a CUDA device; skipped with the reason on a machine without one

A unit test starts nothing: it fails if it imports vLLM, starts a child process, or leaves Ray
or a torch.distributed group (DeepSpeed's) initialised. The unit tests run first, before any
other tier has imported vLLM.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict

import pytest

TIERS = {
    "unit": "pure code in this process (torch, pyarrow, numpy, the tiny tokenizer): seconds",
    "component": "DeepSpeed on gloo, an in-process vLLM engine, child processes",
    "slow": "Ray end to end: the entry point, Ray actors, simulated clusters",
    "gpu": "needs a CUDA device; skipped with the reason on a machine without one",
}
_TIMES = pytest.StashKey[dict]()
_REPORTS = pytest.StashKey[list]()


def tier_of(item: pytest.Item) -> str | None:
    """The item's one tier, or None when it has none or several."""
    names = {m.name for m in item.iter_markers()} & set(TIERS)
    return names.pop() if len(names) == 1 else None


def pytest_configure(config: pytest.Config) -> None:
    for name, what in TIERS.items():
        config.addinivalue_line("markers", f"{name}: {what}")
    config.stash[_TIMES] = defaultdict(lambda: defaultdict(float))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a test without exactly one tier; run the tiers in order (stable within each)."""
    wrong = [item.nodeid for item in items if tier_of(item) is None]
    if wrong:
        raise pytest.UsageError(
            f"{len(wrong)} test(s) without exactly one tier marker ({', '.join(TIERS)}): "
            + ", ".join(wrong[:10])
            + ("" if len(wrong) <= 10 else ", ...")
            + ". Set pytestmark in the module or mark the test (tests/tiers.py)."
        )
    order = list(TIERS)
    items.sort(key=lambda item: order.index(tier_of(item)))


class _ChildProcesses:
    """Counts the child processes started while it is installed (subprocess, multiprocessing)."""

    def __init__(self):
        self.started = 0

    def __enter__(self):
        import multiprocessing.process
        import subprocess

        self._patched = [
            (subprocess.Popen, "__init__"),
            (multiprocessing.process.BaseProcess, "start"),
        ]
        self._originals = [getattr(owner, name) for owner, name in self._patched]
        for (owner, name), original in zip(self._patched, self._originals, strict=True):
            setattr(owner, name, self._counting(original))
        return self

    def _counting(self, original):
        def counted(*args, **kwargs):
            self.started += 1
            return original(*args, **kwargs)

        return counted

    def __exit__(self, *exc):
        for (owner, name), original in zip(self._patched, self._originals, strict=True):
            setattr(owner, name, original)


@pytest.fixture(autouse=True)
def _unit_tests_start_nothing(request: pytest.FixtureRequest):
    """A unit test that imports vLLM, starts a child process, or leaves Ray or a
    torch.distributed group (DeepSpeed) initialised fails, saying which."""
    if tier_of(request.node) != "unit":
        yield
        return
    import torch.distributed

    had_vllm = "vllm" in sys.modules
    with _ChildProcesses() as children:
        yield
    started = []
    if "vllm" in sys.modules and not had_vllm:
        started.append("imported vLLM")
    if children.started:
        started.append(f"started {children.started} child process(es)")
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        started.append("left Ray initialised")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        started.append("left a torch.distributed group initialised")
    if started:
        pytest.fail(
            f"a unit test starts nothing, and this one {', '.join(started)}: "
            "mark it component or slow (tests/tiers.py)",
            pytrace=False,
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    """Time each item, setup and teardown included, into its tier."""
    start = time.perf_counter()
    reports: list[pytest.TestReport] = []
    item.stash[_REPORTS] = reports
    yield
    times = item.config.stash[_TIMES][tier_of(item)]
    times["seconds"] += time.perf_counter() - start
    outcome = "passed"
    for r in reports:
        if r.failed:
            outcome = "failed" if r.when == "call" else "error"
            break
        if r.skipped:
            outcome = "skipped"
    times[outcome] += 1


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    item.stash.get(_REPORTS, []).append(outcome.get_result())


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    times = config.stash[_TIMES]
    if not times:
        return
    terminalreporter.section("time per tier")
    for name in TIERS:
        if name not in times:
            continue
        t = times[name]
        counts = ", ".join(
            f"{int(t[k])} {k}" for k in ("passed", "failed", "error", "skipped") if t[k]
        )
        terminalreporter.write_line(f"tier {name:9s} {t['seconds']:7.1f} s  ({counts})")
