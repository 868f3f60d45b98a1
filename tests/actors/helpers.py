"""Pieces the generator tests share (here and in the real-checkpoint tier): a token's
log-probability under a transformers model, a weight update in the middle of a generation and
what it must leave, and the test environments episodes run (named by their import path)."""

from __future__ import annotations

import os
import threading
import time

import pyarrow as pa
import torch

from actors.episodes import EpisodeSpec, Step
from actors.generator import PolicyGenerator
from actors.vllm_engine import Sampling
from rollout import schema as S


def token_logprobs(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """(R,) the model's log-probability of each response token given all before it."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].float()  # (P+R, V)
    logprobs = logits.log_softmax(-1)[len(prompt) - 1 : -1]  # (R, V)
    return logprobs.gather(-1, torch.tensor(response)[:, None])[:, 0]


# ------------------------------------------------------------------------------ partial rollouts


def update_mid_generation(
    generator: PolicyGenerator, version: int, weights: dict, prompts: pa.Table, sampling: Sampling
) -> dict:
    """Start a continuing generation in a thread, hand it ``weights`` as ``version`` once it
    runs, and return its table and how long the update took."""
    out: dict = {}

    def generate() -> None:
        out["table"] = generator.generate(prompts, sampling, expected_version=version - 1)

    thread = threading.Thread(target=generate)
    thread.start()
    while not generator._takes_updates and thread.is_alive():
        time.sleep(0.001)
    start = time.perf_counter()
    assert generator.update_weights(version, weights) == version
    out["update_seconds"] = time.perf_counter() - start
    out["generation_running_after_update"] = thread.is_alive()
    thread.join(timeout=120)
    return out


def assert_switched(table: pa.Table, old, new, tokens: int, tolerance: float) -> None:
    """Every row of ``table`` ran ``tokens`` tokens, the first ones sampled by version 0 with
    ``old``'s log-probabilities, the rest by version 1 with ``new``'s."""
    for row in table.to_pylist():
        prompt, response = row["prompt_token_ids"], row["response_token_ids"]
        versions = row[S.TOKEN_VERSIONS]
        assert len(response) == tokens and row["finish_reason"] == "length"
        switch = versions.index(1)  # the first token sampled by version 1
        assert 0 < switch < len(response)
        assert versions == [0] * switch + [1] * (len(response) - switch)
        rollout = torch.tensor(row["rollout_logprobs"])
        by_old = token_logprobs(old, prompt, response)
        by_new = token_logprobs(new, prompt, response)
        assert (rollout[:switch] - by_old[:switch]).abs().max() < tolerance
        assert (rollout[switch:] - by_new[switch:]).abs().max() < tolerance
        assert (by_old[switch:] - by_new[switch:]).abs().max() > 1e-2  # the versions differ


# ------------------------------------------------------------------------------ environments

OBSERVATION = " 7+7=14\n"  # text that a re-encoding of the whole response would merge differently


class TwoTurns:
    """Answers the model's first turn with :data:`OBSERVATION`; the second turn ends the
    episode with a reward of the turn's length."""

    stop: tuple[str, ...] = ()

    def __init__(self, hang_on_label: str | None = None):
        self.hang_on_label = hang_on_label

    def reset(self, row):
        return _TwoTurnEpisode(row["label"] == self.hang_on_label)


class _TwoTurnEpisode:
    def __init__(self, hang: bool):
        self.turns, self.hang = 0, hang

    def step(self, turn: str) -> Step:
        self.turns += 1
        if self.hang:
            time.sleep(60)
        if self.turns == 1:
            return Step(OBSERVATION, reward=0.25)
        return Step(done=True, reward=1.0)


TWO_TURNS = EpisodeSpec(
    environment="tests.actors.helpers:TwoTurns", max_turns=4, max_tokens=40, timeout_s=2.0
)


class Misbehaves:
    """Episodes of label "b" hang (``mode="hang"``) or end their process (``mode="exit"``) on
    their first step; the others are :class:`TwoTurns` episodes."""

    stop: tuple[str, ...] = ()

    def __init__(self, mode: str):
        self.mode = mode

    def reset(self, row):
        return _Misbehaving(self.mode) if row["label"] == "b" else _TwoTurnEpisode(False)


class _Misbehaving:
    def __init__(self, mode: str):
        self.mode = mode

    def step(self, turn: str) -> Step:
        if self.mode == "exit":
            os._exit(3)  # the whole process: the generator's, were the environment in it
        time.sleep(60)
        return Step(done=True)
