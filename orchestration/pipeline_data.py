"""Synthetic data for the pipeline demo on the built-in task (SFT, then a reward model, then PPO).

    python -m orchestration.pipeline_data --out data/pipeline [--max-operand 9] [--seed 0]

writes, for every ``"a+b="`` with operands 0..max_operand:

- ``sft.jsonl``: demonstrations ``{prompt, response}``, the right answer (also the reference
  responses the reward model's bias is normalised on);
- ``preferences.jsonl``: ``{prompt, chosen, rejected, strength}`` pairs ranking the right answer
  over every wrong integer and over junk, with a deliberate length bias: answers may carry a filler
  suffix (``"="`` repeated, meaning nothing), and in ``--biased-share`` of the pairs whose two
  responses differ in filler the chosen one is the longer. A reward model can then score length
  instead of correctness; bucket balancing (``rm.balance_lengths``) takes that away;
- ``equal_quality.jsonl``: pairs of the same answer with different filler (which one is
  "chosen" is a coin toss): the share of them where the reward model scores the longer higher
  is its preference for length alone (0.5: none);
- ``candidates.jsonl``: ``{prompt, label, model_a, model_b}``, prompts with the answers of two
  other "models" (RRHF's dataset candidates, ``rrhf.dataset_responses``): ``model_a`` is right
  with probability ``A_RIGHT``, ``model_b`` with ``B_RIGHT``; a wrong answer is another
  prompt's, or junk.

The strength labels map to margins with ``rm.margins`` (Llama 2's margin).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

FILLER = "="
STRENGTHS = {"significantly better": 1.0, "better": 0.5, "slightly better": 0.0}
A_RIGHT, B_RIGHT = 0.6, 0.3


def _wrong(rng: random.Random, right: int, sums: list[int]) -> int:
    """Another prompt's answer: wrong answers come from the same distribution as right ones, so
    an answer alone says nothing and the reward model has to read the prompt."""
    return rng.choice([n for n in sums if n != right])


def _junk(rng: random.Random) -> str:
    return "".join(rng.choice("+=") for _ in range(rng.randint(1, 3)))


def pipeline_rows(max_operand: int, seed: int, biased_share: float) -> dict[str, list[dict]]:
    """The files' rows (see the module docstring)."""
    rng = random.Random(seed)
    sums = [a + b for a in range(max_operand + 1) for b in range(max_operand + 1)]
    sft, prefs, equal, cands = [], [], [], []

    other = random.Random(seed + 1)  # its own stream: the other files stay as they were

    def answer(right: int, p_right: float) -> str:
        if other.random() < p_right:
            return str(right)
        return _junk(other) if other.random() < 0.25 else str(_wrong(other, right, sums))

    for a in range(max_operand + 1):
        for b in range(max_operand + 1):
            prompt, right = f"{a}+{b}=", a + b
            sft.append({"prompt": prompt, "response": str(right)})
            cands.append(
                {
                    "prompt": prompt,
                    "label": str(right),
                    "model_a": answer(right, A_RIGHT),
                    "model_b": answer(right, B_RIGHT),
                }
            )
            prefs += [  # the right answer over every wrong one the task has
                {"prompt": prompt, "chosen": str(right), "rejected": str(n), "strength": "better"}
                for n in sorted(set(sums) - {right})
            ]
            prefs.append(
                {
                    "prompt": prompt,
                    "chosen": str(right),
                    "rejected": _junk(rng),
                    "strength": "significantly better",
                }
            )
            for _ in range(4):  # the length-biased pairs: right vs wrong, filler on one side
                short, long_ = sorted(rng.sample(range(4), 2))
                longer_chosen = rng.random() < biased_share
                chosen_fill, rejected_fill = (long_, short) if longer_chosen else (short, long_)
                prefs.append(
                    {
                        "prompt": prompt,
                        "chosen": str(right) + FILLER * chosen_fill,
                        "rejected": str(_wrong(rng, right, sums)) + FILLER * rejected_fill,
                        "strength": "slightly better",
                    }
                )
            short, long_ = sorted(rng.sample(range(4), 2))
            pair = [str(right) + FILLER * short, str(right) + FILLER * long_]
            rng.shuffle(pair)
            equal.append({"prompt": prompt, "chosen": pair[0], "rejected": pair[1]})
    return {"sft": sft, "preferences": prefs, "equal_quality": equal, "candidates": cands}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestration.pipeline_data")
    parser.add_argument("--out", required=True, help="directory to write the .jsonl files into")
    parser.add_argument("--max-operand", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--biased-share",
        type=float,
        default=0.85,
        help="of the pairs differing in filler, the share whose chosen response is the longer",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in pipeline_rows(args.max_operand, args.seed, args.biased_share).items():
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{path}: {len(rows)} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
