"""The built-in task's metric for any policy directory, without a cluster:

    python -m orchestration.task_eval runs/pipeline-dpo/policy [--samples 16] [--max-operand 4]

Samples ``--samples`` responses (temperature 1, up to ``--max-new-tokens``) for every
``"a+b="`` with operands 0..max-operand with the transformers model on this process's CPU, and
prints the mean ``exact_integer`` score with the demos' EOS rule (a response that never stops
scores 0) and a JSON line. For the stages that generate nothing themselves (sft, rm, offline
dpo), this is how their policy's task metric is measured before and after.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from orchestration.data import addition_examples


def task_score(
    model_path: str, samples: int = 16, max_operand: int = 4, max_new_tokens: int = 4, seed=0
) -> dict[str, float]:
    """Mean ``exact_integer`` (0 for a response without EOS) and the share of right answers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reward_service.rules import exact_integer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, use_safetensors=True).eval()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    scores, right = [], 0
    for prompt, answer in addition_examples(max_operand):
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                num_return_sequences=samples,
                pad_token_id=pad,
                eos_token_id=eos,
            )
        for row in out[:, ids.shape[1] :].tolist():
            stopped = eos in row
            text = tokenizer.decode(row[: row.index(eos)] if stopped else row)
            score = exact_integer(prompt, text, answer) if stopped else 0.0
            scores.append(float(score or 0.0))
            right += score == 1.0
    return {"exact_integer": sum(scores) / len(scores), "right_fraction": right / len(scores)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestration.task_eval")
    parser.add_argument("model", help="a policy directory (Hugging Face, safetensors)")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--max-operand", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model = Path(args.model)
    if not (model / "config.json").is_file() or not any(model.glob("*.safetensors")):
        print(
            f"error: {args.model} is not a policy directory (config.json and safetensors "
            "weights; e.g. runs/<name>/policy)",
            file=sys.stderr,
        )
        return 2
    result = task_score(args.model, args.samples, args.max_operand, args.max_new_tokens, args.seed)
    print(
        f"{args.model}: exact_integer {result['exact_integer']:.3f}, right "
        f"{result['right_fraction']:.3f} ({args.samples} samples x "
        f"{len(addition_examples(args.max_operand))} prompts)"
    )
    print(json.dumps({"model": args.model, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
