"""The built-in tasks: prompt sets made in code (no download) and the text the built-in tiny
model's tokenizer is trained on for each (``orchestration.tiny_model``).

- ``builtin:addition``: ``"a+b="`` -> ``"c"``, operands 0..max_operand (the demo's task);
- ``builtin:calculator``: those sums and sums of two-digit operands, for multi-turn episodes
  with the calculator tool (``actors.environments``);
- ``builtin:guess``: one prompt per secret of the guessing game.
"""

from __future__ import annotations


def addition_examples(max_operand: int) -> list[tuple[str, str]]:
    """The built-in task: ``"a+b="`` -> ``"c"`` for every pair of operands in 0..max_operand.

    A random policy almost never answers with the right number and then stops, so it scores near
    0 under ``exact_integer``; the answer is one or two tokens, so a tiny model learns it by RL in
    minutes.
    """
    return [
        (f"{a}+{b}=", str(a + b)) for a in range(max_operand + 1) for b in range(max_operand + 1)
    ]


def addition_corpus(max_operand: int) -> list[str]:
    """Text to train the demo tokenizer on (every prompt followed by its answer)."""
    return [prompt + answer for prompt, answer in addition_examples(max_operand)]


CALCULATOR_LARGE = (10, 99)  # the calculator task's large operands
GUESS_RANGE = (1, 8)  # the guessing game's secrets (``actors.environments.GuessNumber``)


def calculator_examples(
    max_operand: int, large: int = 40, seed: int = 0, exclude: frozenset = frozenset()
) -> list[tuple[str, str]]:
    """The calculator task (``episodes.tools: [calculator]``): the built-in task's sums of
    small operands (0..max_operand), which a tiny model can learn by heart, and ``large`` sums
    of two-digit operands drawn with ``seed`` (none of the prompts in ``exclude``), which it
    answers right only by calling the calculator (``<calc>47+85</calc>``)."""
    import random

    rng = random.Random(seed)
    low, high = CALCULATOR_LARGE
    big: list[tuple[str, str]] = []
    seen = set(exclude)
    while len(big) < large:
        a, b = rng.randint(low, high), rng.randint(low, high)
        prompt = f"{a}+{b}="
        if prompt not in seen:
            seen.add(prompt)
            big.append((prompt, str(a + b)))
    return addition_examples(max_operand) + big


def guess_examples() -> list[tuple[str, str]]:
    """The guessing game (``episodes.environment: guess_number``): one prompt per secret."""
    low, high = GUESS_RANGE
    return [(f"guess {low}-{high}:", str(n)) for n in range(low, high + 1)]


BUILTIN_TASKS = {
    "builtin:addition": addition_examples,
    "builtin:calculator": calculator_examples,
    "builtin:guess": lambda max_operand: guess_examples(),
}
"""Built-in prompt sets: source -> ``(max_operand) -> [(prompt, label)]``."""


def builtin_corpus(source: str, max_operand: int) -> list[str]:
    """Text to train the built-in tiny model's tokenizer on for a built-in task: its prompts
    and answers, and for the multi-turn tasks their tool calls and observations."""
    corpus = addition_corpus(max_operand)
    if source == "builtin:calculator":  # the RL prompts and those of the demonstrations
        for prompt, answer in calculator_examples(max_operand) + calculator_examples(
            max_operand, 200, seed=1
        ):
            corpus.append(f"{prompt}<calc>{prompt[:-1]}</calc><result>{answer}</result>{answer}")
        corpus.append("<error>bad argument for calc</error>")
    elif source == "builtin:guess":
        corpus += [f"{p}{a} higher\n lower\n say a number\n" for p, a in guess_examples()]
    return corpus
