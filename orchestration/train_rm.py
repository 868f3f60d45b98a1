"""Train a small reward model on preference pairs: a thin command over the learner engine.

    python -m orchestration.train_rm --base my/sft-model --out runs/rm --pairs prefs.jsonl
    python -m orchestration.train_rm --base <tiny model> --out <dir> --builtin-addition 4

The training is the engine's reward-model objective (``learner.supervised.PairwiseRanking``:
pairs of one prompt kept together, Llama 2's margin, ChatGLM-RLHF's L2 regulariser, a fresh
N(0, 1/sqrt(d+1)) head, dropout off) on one gloo rank in this process, without Ray; the model is
saved as the engine exports it (a causal LM with ``value_head.safetensors``, as
``reward_service.reward_model`` and ``learner.critic_init`` read it). For a dataset in any of the
preference formats, on several ranks, with length balancing, cycle removal, bias normalisation
and the evaluation report, run the ``rm`` stage instead (``python -m orchestration.train
--config pipeline-rm``). The demo's ``builtin:addition-rm`` is this command with
``--builtin-addition`` (the run starts it in a process of its own).

Pairs come from a JSONL file (``{"prompt", "chosen", "rejected", "margin"?}`` or rankings
``{"prompt", "responses": [best, ..., worst]}``, all K-choose-2 pairs) or are synthesised from
the built-in task's examples (:func:`addition_pairs`). A held-out share of the pairs measures
accuracy (``r_w > r_l``); it is printed and saved as ``train_metrics.json`` next to the model.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from rollout import schema as S


@dataclass(frozen=True)
class Pair:
    """Token ids of one preference: ``prompt + chosen`` is preferred to ``prompt + rejected``."""

    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]
    margin: float = 0.0


# ------------------------------------------------------------------------------ pairs


def addition_pairs(
    tokenizer,
    examples: list[tuple[str, str]],
    seed: int = 0,
    junk_per_prompt: int = 8,
    margin: float = 3.0,
) -> list[Pair]:
    """Preference pairs for the built-in task (``examples``: prompt -> integer answer), ordered
    as its verifier orders answers: the right answer then EOS > a wrong integer then EOS >
    anything else (random tokens, with or without EOS).

    Per prompt: the right answer against every wrong integer from 0 to the largest answer + 5,
    with ``margin`` (Llama 2's margin, here the verifier's gap: without it the format gap
    dominates and the policy settles on some integer before it finds the answer); and
    ``junk_per_prompt`` pairs each of right > junk (with the margin) and wrong > junk.
    """
    rng = random.Random(seed)
    eos = tokenizer.eos_token_id
    vocab = [i for i in range(len(tokenizer)) if i != eos]

    def ids(text: str) -> tuple[int, ...]:
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

    def junk() -> tuple[int, ...]:
        while True:
            tokens = tuple(rng.choice(vocab) for _ in range(rng.randint(1, 4)))
            if not tokenizer.decode(tokens).strip().lstrip("-").isdigit():
                return tokens + ((eos,) if rng.random() < 0.5 else ())

    pairs = []
    top = max(int(answer) for _, answer in examples) + 5
    for prompt, answer in examples:
        p = ids(prompt)
        right = ids(answer) + (eos,)
        wrongs = [ids(str(v)) + (eos,) for v in range(top + 1) if v != int(answer)]
        pairs += [Pair(p, right, wrong, margin=margin) for wrong in wrongs]
        for _ in range(junk_per_prompt):
            pairs.append(Pair(p, right, junk(), margin=margin))
            pairs.append(Pair(p, rng.choice(wrongs), junk()))
    return [q for q in pairs if q.chosen != q.rejected]


def read_pairs(path: str, tokenizer) -> list[Pair]:
    """Pairs from JSONL: ``{"prompt", "chosen", "rejected", "margin"?}`` or
    ``{"prompt", "responses": [best, ..., worst]}``; ties dropped. Errors name the line."""
    eos = tokenizer.eos_token_id

    def ids(text: str, end: bool) -> tuple[int, ...]:
        out = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
        return out + ((eos,) if end and eos is not None else ())

    pairs = []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = ids(row["prompt"], end=False)
            if "responses" in row:
                ranked = [ids(r, end=True) for r in row["responses"]]
                pairs += [
                    Pair(prompt, ranked[i], ranked[j])
                    for i in range(len(ranked))
                    for j in range(i + 1, len(ranked))
                ]
            else:
                pairs.append(
                    Pair(
                        prompt,
                        ids(row["chosen"], end=True),
                        ids(row["rejected"], end=True),
                        float(row.get("margin", 0.0)),
                    )
                )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}, line {n}: not a preference row ({e!r})") from None
    return [p for p in pairs if p.chosen != p.rejected]


# ------------------------------------------------------------------------------ training


def groups_table(pairs: list[Pair]) -> pa.Table:
    """Pairs as prompt groups (``rollout.schema``'s prompt-group columns): one row per prompt,
    its distinct responses, and its pairs as indices into them with their margins."""
    groups: dict[tuple[int, ...], tuple[dict, list]] = {}
    for p in pairs:
        index, ranked = groups.setdefault(p.prompt, ({}, []))
        c = index.setdefault(p.chosen, len(index))
        r = index.setdefault(p.rejected, len(index))
        ranked.append((c, r, p.margin))
    prompts = list(groups)
    responses = [list(map(list, groups[k][0])) for k in prompts]
    ranked = [groups[k][1] for k in prompts]
    return pa.table(
        {
            S.PROMPT_ID: pa.array(range(len(prompts)), pa.int64()),
            S.PROMPT_TOKEN_IDS: pa.array([list(k) for k in prompts], S.TOKEN_IDS_TYPE),
            S.RESPONSES: pa.array(responses, pa.list_(S.TOKEN_IDS_TYPE)),
            S.PAIR_CHOSEN: pa.array([[c for c, _, _ in g] for g in ranked], pa.list_(pa.int32())),
            S.PAIR_REJECTED: pa.array([[r for _, r, _ in g] for g in ranked], pa.list_(pa.int32())),
            S.PAIR_MARGIN: pa.array([[m for _, _, m in g] for g in ranked], pa.list_(pa.float32())),
        }
    )


@dataclass(frozen=True)
class TrainSpec:
    steps: int = 300
    groups_per_step: int = 4  # every pair of a prompt in the same step
    lr: float = 1e-3
    reg: float = 0.001
    held_out: float = 0.2
    seed: int = 0


def train_reward_model(
    base: str, out: str, pairs: list[Pair], spec: TrainSpec = TrainSpec(), *, log_every: int = 50
) -> dict[str, float]:
    """Train on ``pairs`` (a held-out share of them kept apart) with the learner engine on one
    rank, save to ``out``; returns the metrics (``train_accuracy``, ``held_out_accuracy``,
    ``loss_first``, ``loss_last``, counts, time)."""
    from transformers import AutoTokenizer

    from learner.engine import Engine, LearnerSpec, OptimizerSpec
    from learner.supervised import PairwiseRanking

    if len(pairs) < 10:
        raise ValueError(f"{len(pairs)} preference pairs: too few to train and hold some out")
    start = time.perf_counter()
    shuffled = pairs[:]
    random.Random(spec.seed).shuffle(shuffled)
    cut = max(1, int(len(shuffled) * spec.held_out))
    held, train = groups_table(shuffled[:cut]), groups_table(shuffled[cut:])
    tokenizer = AutoTokenizer.from_pretrained(base)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    learner_spec = LearnerSpec(
        model_path=base,
        policy_optim=OptimizerSpec(lr=spec.lr),
        objective=PairwiseRanking(reg=spec.reg),
        pad_token_id=pad,
        seed=spec.seed,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = Engine(learner_spec, rank=0, world_size=1, master_addr="127.0.0.1", master_port=port)
    rng = random.Random(spec.seed + 1)
    size = min(spec.groups_per_step, train.num_rows)
    losses = []
    for step in range(spec.steps):
        batch = train.take(pa.array(rng.sample(range(train.num_rows), size)))
        losses.append(engine.train(batch)["rm/loss"])
        if log_every and (step % log_every == 0 or step == spec.steps - 1):
            print(f"[train_rm] step {step:4d}/{spec.steps} loss {losses[-1]:.4f}", flush=True)
    metrics = {
        "pairs_train": float(len(pairs) - cut),
        "pairs_held_out": float(cut),
        "loss_first": losses[0],
        "loss_last": sum(losses[-10:]) / len(losses[-10:]),
        "train_accuracy": engine.evaluate(train)["rm/accuracy"],
        "held_out_accuracy": engine.evaluate(held)["rm/accuracy"],
        "seconds": time.perf_counter() - start,
    }
    tmp = Path(f"{out}.tmp")
    engine.save_policy(str(tmp))  # the export, written beside tmp and renamed into it
    (tmp / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
    tmp.replace(out)  # the whole directory at once: a crash leaves no half-saved model
    return metrics


def build_addition_rm(
    out: str, base: str, examples: list[tuple[str, str]], spec: TrainSpec = TrainSpec()
) -> dict[str, float]:
    """The demo's reward model (``builtin:addition-rm``), unless ``out`` already holds one."""
    path = Path(out)
    if (path / "train_metrics.json").is_file():
        return json.loads((path / "train_metrics.json").read_text())
    from transformers import AutoTokenizer

    pairs = addition_pairs(AutoTokenizer.from_pretrained(base), examples, spec.seed)
    return train_reward_model(base, out, pairs, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestration.train_rm", description=__doc__)
    parser.add_argument("--base", required=True, help="causal LM to start from (HF directory)")
    parser.add_argument("--out", required=True, help="directory to save the reward model in")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pairs", help="JSONL of preference pairs or rankings")
    source.add_argument(
        "--builtin-addition",
        type=int,
        metavar="MAX_OPERAND",
        help="pairs built from the built-in task with operands 0..MAX_OPERAND",
    )
    for name, default in vars(TrainSpec()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    spec = TrainSpec(**{k: getattr(args, k) for k in vars(TrainSpec())})
    try:
        if args.pairs is not None:
            pairs = read_pairs(args.pairs, tokenizer)
            metrics = train_reward_model(args.base, args.out, pairs, spec)
        else:
            examples = [
                (f"{a}+{b}=", str(a + b))
                for a in range(args.builtin_addition + 1)
                for b in range(args.builtin_addition + 1)
            ]
            metrics = build_addition_rm(args.out, args.base, examples, spec)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("METRICS " + json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
