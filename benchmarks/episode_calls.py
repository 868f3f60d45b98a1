"""Tool calls of a calculator run, split by operand size: for each saved rollout of the RL
stage, the share of episodes that called the tool and the share answered right, on the sums of
small operands and on the sums of two-digit ones (``orchestration/pipelines/calculator.yaml``).

    python -m benchmarks.episode_calls runs/calculator

Prints one line per rollout file and kind, then a JSON line with the first and last file's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow.parquet as pq


def split(path: Path, tokenizer) -> dict[str, dict[str, float]]:
    rows = pq.read_table(path).to_pylist()
    out = {}
    for kind in ("small", "large"):
        # a prompt of two-digit operands ("47+85=") is longer than one of one-digit ones
        picked = [
            r
            for r in rows
            if (len(tokenizer.decode(r["prompt_token_ids"])) > 4) == (kind == "large")
        ]
        n = max(len(picked), 1)
        out[kind] = {
            "episodes": len(picked),
            "call_rate": sum(r["tool_calls"] > 0 for r in picked) / n,
            "right": sum(r.get("reward/exact_integer") == 1.0 for r in picked) / n,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="the calculator pipeline's root (its sft/ and rl/ stages)")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    root = Path(args.root)
    tokenizer = AutoTokenizer.from_pretrained(root / "sft" / "policy")
    files = sorted((root / "rl" / "rollouts").glob("iter_*.parquet"))
    if not files:
        parser.error(f"no rollouts under {root / 'rl' / 'rollouts'}")
    results = {}
    for path in files:
        results[path.stem] = split(path, tokenizer)
        for kind, r in results[path.stem].items():
            print(
                f"{path.stem} {kind:5s} {r['episodes']:3d} episodes: call rate {r['call_rate']:.3f}"
                f", right {r['right']:.3f}"
            )
    print(json.dumps({"first": results[files[0].stem], "last": results[files[-1].stem]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
