"""Train a small reward model on preference pairs with the pairwise ranking loss.

    python -m reward_service.train_rm --base my/sft-model --out runs/rm --pairs prefs.jsonl

(The demo's ``builtin:addition-rm`` is trained by the run itself, with :func:`build_addition_rm`.)

The reward model is the base causal LM's body with a one-label classification head
(``*ForSequenceClassification``, initialised from the base checkpoint, head fresh), read at the
last real token as ``reward_service.reward_model.RewardModel`` reads it. Loss per pair
(``TECHNIQUES.md``, "Reward model training"):

    -log sigmoid(r_w - r_l - m) + reg * (r_w^2 + r_l^2)

with ``m`` the pair's margin (Llama 2) and ``reg`` ChatGLM-RLHF's score regulariser. Ties
(chosen == rejected) are dropped. Pairs come from a JSONL file (``{"prompt", "chosen",
"rejected", "margin"?}`` or rankings ``{"prompt", "responses": [best, ..., worst]}``, all
K-choose-2 pairs) or are synthesised from the built-in task's examples (:func:`addition_pairs`).
A held-out share of the pairs measures accuracy (``r_w > r_l``); it is printed and saved as
``train_metrics.json`` next to the model.

This is a small single-process trainer for the demo and for small models; a large reward model
belongs in a proper distributed trainer.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from reward_service.reward_model import last_token_index, pad_batch


@dataclass(frozen=True)
class Pair:
    """Token ids of one preference: ``prompt + chosen`` is preferred to ``prompt + rejected``."""

    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]
    margin: float = 0.0


def pairwise_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor, reg: float = 0.0
) -> torch.Tensor:
    """Mean over pairs of ``-log sigmoid(r_w - r_l - m) + reg (r_w^2 + r_l^2)``; all (P,).

    At ``r_w == r_l``, ``m = 0``, ``reg = 0`` the loss is ``ln 2``.
    """
    ranking = -F.logsigmoid(chosen - rejected - margin)
    return (ranking + reg * (chosen**2 + rejected**2)).mean()


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


def _scores(model, sequences: list[tuple[int, ...]], pad_token_id: int) -> torch.Tensor:
    ids, mask = pad_batch(sequences, pad_token_id, "right")
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    hidden = model.base_model(
        input_ids=ids, attention_mask=mask, position_ids=position_ids
    ).last_hidden_state  # (B, T, H)
    return model.score(hidden[torch.arange(len(sequences)), last_token_index(mask)]).squeeze(-1)


def accuracy(model, pairs: list[Pair], pad_token_id: int, batch: int = 256) -> float:
    """Share of pairs with ``r(chosen) > r(rejected)``."""
    right = 0
    with torch.no_grad():
        for i in range(0, len(pairs), batch):
            part = pairs[i : i + batch]
            w = _scores(model, [p.prompt + p.chosen for p in part], pad_token_id)
            lo = _scores(model, [p.prompt + p.rejected for p in part], pad_token_id)
            right += int((w > lo).sum())
    return right / max(len(pairs), 1)


@dataclass(frozen=True)
class TrainSpec:
    steps: int = 400
    batch_pairs: int = 64
    lr: float = 1e-3
    reg: float = 0.001
    held_out: float = 0.2
    seed: int = 0


def train_reward_model(
    base: str, out: str, pairs: list[Pair], spec: TrainSpec = TrainSpec(), *, log_every: int = 50
) -> dict[str, float]:
    """Train on ``pairs`` (a held-out share kept apart), save to ``out``; returns the metrics
    (``train_accuracy``, ``held_out_accuracy``, ``loss_first``, ``loss_last``, counts, time)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if len(pairs) < 10:
        raise ValueError(f"{len(pairs)} preference pairs: too few to train and hold some out")
    start = time.perf_counter()
    torch.manual_seed(spec.seed)
    shuffled = pairs[:]
    random.Random(spec.seed).shuffle(shuffled)
    cut = max(1, int(len(shuffled) * spec.held_out))
    held, train = shuffled[:cut], shuffled[cut:]
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=1, use_safetensors=True, dtype=torch.float32
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.config.pad_token_id = pad
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr)
    rng = random.Random(spec.seed + 1)
    losses = []
    model.train()
    for step in range(spec.steps):
        batch = rng.sample(train, min(spec.batch_pairs, len(train)))
        w = _scores(model, [p.prompt + p.chosen for p in batch], pad)
        lo = _scores(model, [p.prompt + p.rejected for p in batch], pad)
        margin = torch.tensor([p.margin for p in batch])
        loss = pairwise_loss(w, lo, margin, spec.reg)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == spec.steps - 1):
            print(f"[train_rm] step {step:4d}/{spec.steps} loss {loss:.4f}", flush=True)
    model.eval()
    metrics = {
        "pairs_train": float(len(train)),
        "pairs_held_out": float(len(held)),
        "loss_first": losses[0],
        "loss_last": sum(losses[-10:]) / len(losses[-10:]),
        "train_accuracy": accuracy(model, train, pad),
        "held_out_accuracy": accuracy(model, held, pad),
        "seconds": time.perf_counter() - start,
    }
    tmp = Path(f"{out}.tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
    tmp.replace(out)  # the whole directory at once: a crash leaves no half-saved model
    return metrics


def build_addition_rm(
    out: str, base: str, examples: list[tuple[str, str]], seed: int = 0
) -> dict[str, float]:
    """The demo's reward model (``builtin:addition-rm``), unless ``out`` already holds one."""
    path = Path(out)
    if (path / "train_metrics.json").is_file():
        return json.loads((path / "train_metrics.json").read_text())
    from transformers import AutoTokenizer

    pairs = addition_pairs(AutoTokenizer.from_pretrained(base), examples, seed)
    return train_reward_model(base, out, pairs, TrainSpec(seed=seed))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reward_service.train_rm", description=__doc__)
    parser.add_argument("--base", required=True, help="causal LM to start from (HF directory)")
    parser.add_argument("--out", required=True, help="directory to save the reward model in")
    parser.add_argument("--pairs", required=True, help="JSONL of preference pairs or rankings")
    for name, default in vars(TrainSpec()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    try:
        pairs = read_pairs(args.pairs, tokenizer)
        spec = TrainSpec(**{k: getattr(args, k) for k in vars(TrainSpec())})
        metrics = train_reward_model(args.base, args.out, pairs, spec)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
