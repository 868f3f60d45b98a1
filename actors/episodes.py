"""Multi-turn episodes: the environment and tool interfaces, and the runner the generator drives.

An episode is one token sequence: the prompt, the model's turn, the environment's observation
(a tool's result, a game's feedback), the model's next turn, and so on. The generator keeps it as
token ids end to end (``actors.vllm_engine.VLLMEngine.generate_continuing``): the model's tokens
are never decoded and re-encoded; an observation is tokenized once and appended. The rollout
row's response is every token after the prompt, with ``loss_mask`` 1 on the model's tokens and
0 on the observations'.

**Environments** (``package.module:object`` in the config, or a built-in of
``actors.environments``): the object, called with the config's ``params``, gives an
:class:`Environment`: its ``stop`` strings end a model turn (besides EOS), and ``reset(row)``
starts an :class:`Episode` from the dataset row (its ``label`` and metadata), whose
``step(turn)`` takes the model's turn as text and returns a :class:`Step`: the observation (text,
or token ids to append as they are), a reward, and whether the episode is done.

**Tools** are one kind of environment (``actors.environments.ToolEnvironment``): the model calls
a :class:`Tool` by writing ``<name>argument</name>``; the result comes back as
``<result>...</result>``. A call whose argument does not match the tool's ``arguments`` pattern
(its schema) comes back as an ``<error>``: the model reads it, nothing fails.

**Limits**: every ``step`` (with the episode's ``reset`` before its first) runs in a thread of
its own and is given ``timeout_s``; one that raises, hangs past its limit or returns something
that is not a :class:`Step` (a tool that returns something that is not text, a reward that is
not a finite number, ids outside the vocabulary) ends its episode, which records why
(``episode_end``: ``<tool or environment>:raised|timeout|garbage``); the run goes on. A hung
call's thread is abandoned, not killed (Python cannot kill a thread), unless the environment
runs in its own actor (``isolation: actor``, ``actors.environment_host``), which is restarted;
a tool that runs code of its own runs it in a limited child process
(``actors.environments.PythonTool``) either way. Episodes end at ``max_turns`` model turns and
``max_tokens`` response tokens (model and observation together).
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

ENVIRONMENT = "environment"  # who is blamed for a fault outside any tool call


@dataclass(frozen=True)
class Step:
    """What the environment answers to one model turn.

    Attributes:
        observation: text to show the model (tokenized once, in the chat template's
            observation turn when the model has one), token ids to append as they are, or None
            (nothing to add: the episode must then be done).
        reward: this turn's reward (summed over the episode into ``episode_reward``).
        done: the episode is over (the model answered, the game ended).
        tool: the tool this turn called, if any (counted in ``tool_calls``).
    """

    observation: str | Sequence[int] | None = None
    reward: float = 0.0
    done: bool = False
    tool: str | None = None


@runtime_checkable
class Episode(Protocol):
    def step(self, turn: str) -> Step: ...


@runtime_checkable
class Environment(Protocol):
    """``stop``: texts that end a model turn (a tool call's closing tag); ``reset(row)``: a new
    episode for a dataset row (a dict of the prompt table's columns: ``label`` and metadata)."""

    stop: Sequence[str]

    def reset(self, row: Mapping[str, Any]) -> Episode: ...


@runtime_checkable
class Tool(Protocol):
    """A function the model may call: ``name`` (the call's tag), ``arguments`` (a regular
    expression the whole argument must match: the tool's schema), ``description`` (one line,
    for prompts and docs) and ``__call__(argument) -> str``."""

    name: str
    arguments: str
    description: str

    def __call__(self, argument: str) -> str: ...


class Fault(Exception):
    """A tool or the environment broke (raised, hung, returned garbage): the episode ends."""

    def __init__(self, who: str, reason: str, detail: str = ""):
        super().__init__(f"{who}: {reason}" + (f" ({detail})" if detail else ""))
        self.who, self.reason, self.detail = who, reason, detail

    def __reduce__(self):  # crosses processes (an environment in its own actor)
        return (Fault, (self.who, self.reason, self.detail))

    @property
    def end(self) -> str:
        return f"{self.who}:{self.reason}"


@dataclass(frozen=True)
class EpisodeSpec:
    """Multi-turn episodes, as the config sets them (``episodes`` section).

    ``environment``: a built-in (``actors.environments.BUILTIN``) or ``package.module:object``;
    ``params`` go to it. ``max_turns``: model turns per episode; ``max_tokens``: response tokens
    per episode, model and observations together (each turn also stops at the sampling's
    ``max_new_tokens``); ``timeout_s``: the longest one ``reset`` or ``step`` may take;
    ``observation_role``: the chat template role observations are written as;
    ``isolation``: ``thread`` (in the generator's process) or ``actor`` (its own process,
    ``actors.environment_host``)."""

    environment: str
    params: Mapping[str, Any] = field(default_factory=dict)
    max_turns: int = 4
    max_tokens: int = 64
    timeout_s: float = 5.0
    observation_role: str = "tool"
    isolation: str = "thread"


@dataclass
class Outcome:
    """The runner's answer to a finished model turn: observation ids to append (None: the
    episode ends, with ``end``), the turn's reward and whether it called a tool."""

    observation: list[int] | None
    reward: float = 0.0
    tool: str | None = None
    end: str | None = None
    detail: str = ""  # a fault's exception or returned value


class ObservationFormat:
    """Observation text -> token ids, the way the model was trained to see another party's turn.

    With a chat template, an observation is the template's turn for ``role`` followed by the
    generation prompt of the model's next turn, plus, when the model's turn did not end with the
    template's own end-of-turn (it stopped at a tool call's closing tag), the text that closes
    it. The pieces are read off the template itself by rendering a probe conversation. Without a
    chat template the observation text is appended as it is."""

    _USER, _REPLY, _SEEN = "\u2402user\u2402", "\u2402reply\u2402", "\u2402seen\u2402"

    def __init__(self, tokenizer, role: str):
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        self.close = self.before = self.after = ""
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        if not self.chat:
            return
        talk = [
            {"role": "user", "content": self._USER},
            {"role": "assistant", "content": self._REPLY},
        ]
        base = tokenizer.apply_chat_template(talk, tokenize=False)
        full = tokenizer.apply_chat_template(
            talk + [{"role": role, "content": self._SEEN}],
            tokenize=False,
            add_generation_prompt=True,
        )
        if not full.startswith(base) or self._SEEN not in full:
            raise ValueError(
                f"the chat template does not render a {role!r} turn after the assistant's as an "
                "addition to the conversation; set episodes.observation_role to a role it knows"
            )
        self.close = base[base.index(self._REPLY) + len(self._REPLY) :]
        self.before, self.after = full[len(base) :].split(self._SEEN)
        eos_text = tokenizer.decode([self.eos]) if self.eos is not None else ""
        self.close_after_eos = self.close.removeprefix(eos_text) if eos_text else self.close

    def ids(self, observation: str | Sequence[int], turn_ended_with_eos: bool) -> list[int]:
        """The tokens to append after the model's turn; token ids are appended as they are
        (``Fault`` for ids outside the vocabulary)."""
        if not isinstance(observation, str):
            try:
                ids = [int(t) for t in observation]
            except (TypeError, ValueError):
                raise Fault(ENVIRONMENT, "garbage", "observation ids are not integers") from None
            if any(not 0 <= t < len(self.tokenizer) for t in ids):
                raise Fault(ENVIRONMENT, "garbage", "observation ids outside the vocabulary")
            return ids
        if not self.chat:
            text = observation
        else:
            close = self.close_after_eos if turn_ended_with_eos else self.close
            text = close + self.before + observation + self.after
        return list(self.tokenizer.encode(text, add_special_tokens=False))


class HostedEnvironment:
    """An environment that lives in another process (``actors.environment_host``). The runner
    asks it whom to blame for hung calls (all at once: the engine loop waits on it), restarts it
    after one, and the generator has it forget each batch's episodes."""

    stop: Sequence[str] = ()

    def reset(self, row: Mapping[str, Any]) -> Episode:
        raise NotImplementedError

    def blame(self, episodes: Sequence[Episode | None]) -> list[str | None]:
        """The tool each episode is calling, None where none (or no answer in time)."""
        raise NotImplementedError

    def restart(self) -> None:
        raise NotImplementedError

    def forget(self) -> None:
        raise NotImplementedError


@dataclass
class _Answer:
    """What a step's thread brings back: the environment's step, or the fault that ended it."""

    step: Step | None = None
    fault: Fault | None = None


class EpisodeRunner:
    """The environment side of a batch of episodes, one per sample ``k``, for the engine loop.

    ``submit(k, turn_ids, ended_with_eos)`` hands the model's finished turn to the episode's
    ``step`` (after ``reset`` on its first turn) in a thread of its own: the engine keeps
    generating the other episodes meanwhile. ``ready(wait_s)`` returns the outcomes that
    arrived, and a timeout outcome for each call past its limit. Tokenizing (the turn's text,
    the observation's ids) happens in the engine loop's thread, which vLLM's detokenizer shares
    the tokenizer with; the threads run user code only."""

    def __init__(
        self,
        environment: Environment,
        spec: EpisodeSpec,
        observations: ObservationFormat,
        rows: Sequence[Mapping[str, Any]],
    ):
        self.environment, self.spec, self.observations = environment, spec, observations
        self.rows = rows  # per sample
        self.episodes: dict[int, Episode] = {}
        self._done: queue.Queue[tuple[int, int, _Answer]] = queue.Queue()
        # k -> (deadline, call number, whether the turn ended with an end-of-turn token)
        self._calls_out: dict[int, tuple[float, int, bool]] = {}
        self._calls = 0

    @property
    def pending(self) -> bool:
        return bool(self._calls_out)

    def stops_in(self, turn_ids: Sequence[int]) -> bool:
        """Whether the turn's text holds one of the environment's stop strings (a turn that a
        weight update split in two: vLLM looks for them in each part alone)."""
        stops = self.environment.stop
        return bool(stops) and any(s in self._text(turn_ids) for s in stops)

    def _text(self, turn_ids: Sequence[int]) -> str:
        return self.observations.tokenizer.decode(list(turn_ids), skip_special_tokens=True)

    def submit(self, k: int, turn_ids: Sequence[int], ended_with_eos: bool) -> None:
        self._calls += 1
        call = self._calls
        self._calls_out[k] = (time.monotonic() + self.spec.timeout_s, call, ended_with_eos)
        text = self._text(turn_ids)

        def work() -> None:
            try:
                answer = _Answer(step=self._step(k, text))
            except Fault as fault:
                answer = _Answer(fault=fault)
            except Exception as e:  # noqa: BLE001 - user code: recorded as the episode's end
                answer = _Answer(fault=Fault(self._blame([k])[0], "raised", f"{e!r:.200}"))
            self._done.put((k, call, answer))

        threading.Thread(target=work, name=f"episode-{k}", daemon=True).start()

    def _step(self, k: int, text: str) -> Step:
        episode = self.episodes.get(k)
        if episode is None:
            episode = self.environment.reset(self.rows[k])
            if not isinstance(episode, Episode):
                raise Fault(ENVIRONMENT, "garbage", f"reset returned {type(episode).__name__}")
            self.episodes[k] = episode
        step = episode.step(text)
        if not isinstance(step, Step):
            raise Fault(ENVIRONMENT, "garbage", f"step returned {type(step).__name__}")
        try:
            reward = float(step.reward)
        except (TypeError, ValueError):
            reward = float("nan")
        if not math.isfinite(reward):
            raise Fault(step.tool or ENVIRONMENT, "garbage", f"reward {step.reward!r}")
        return replace(step, reward=reward)

    def _outcome(self, answer: _Answer, ended_with_eos: bool) -> Outcome:
        if answer.fault is not None:
            fault = answer.fault
            tool = None if fault.who == ENVIRONMENT else fault.who
            return Outcome(None, tool=tool, end=fault.end, detail=str(fault))
        step = answer.step
        if step.done or step.observation is None:
            return Outcome(None, step.reward, step.tool, end="done")
        try:
            ids = self.observations.ids(step.observation, ended_with_eos)
        except Fault as fault:
            return Outcome(None, step.reward, step.tool, end=fault.end, detail=str(fault))
        return Outcome(ids, step.reward, step.tool)

    def ready(self, wait_s: float) -> list[tuple[int, Outcome]]:
        """Outcomes that arrived (waiting up to ``wait_s`` for a first one), and a timeout for
        every call past its limit (in this process its thread is abandoned, a late answer
        dropped; a hosted environment is restarted)."""
        out = []
        deadline = time.monotonic() + wait_s
        while True:
            try:
                k, call, answer = self._done.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            limit, current, ended_with_eos = self._calls_out.get(k, (0.0, -1, False))
            if current == call:  # not timed out meanwhile
                del self._calls_out[k]
                out.append((k, self._outcome(answer, ended_with_eos)))
            if self._done.empty():
                break
        now = time.monotonic()
        hung = [k for k, (limit, _, _) in self._calls_out.items() if now >= limit]
        for k, who in zip(hung, self._blame(hung), strict=True):
            del self._calls_out[k]
            out.append((k, Outcome(None, tool=who, end=f"{who or ENVIRONMENT}:timeout")))
        if hung and isinstance(self.environment, HostedEnvironment):
            self.environment.restart()  # kills the hung calls with the process
        return out

    def _blame(self, ks: Sequence[int]) -> list[str | None]:
        """The tool each episode is calling (None: the environment itself)."""
        episodes = [self.episodes.get(k) for k in ks]
        if isinstance(self.environment, HostedEnvironment):
            return self.environment.blame(episodes) if ks else []
        return [getattr(e, "tool_in_call", None) for e in episodes]

    def next_wait(self) -> float:
        """Seconds until the first pending call's limit."""
        if not self._calls_out:
            return 0.0
        return max(0.0, min(d for d, _, _ in self._calls_out.values()) - time.monotonic())


def resolve_object(reference: str, builtins: Mapping[str, Callable], params: Mapping[str, Any]):
    """``reference`` (a built-in name, or ``package.module:object``) called with ``params``."""
    import importlib

    if reference in builtins:
        factory = builtins[reference]
    elif ":" in reference:
        module, _, name = reference.partition(":")
        try:
            factory = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"{reference!r}: cannot import it ({e})") from None
    else:
        raise ValueError(
            f"{reference!r}: not a built-in ({', '.join(sorted(builtins))}) and not "
            "package.module:object"
        )
    if not callable(factory):
        raise ValueError(f"{reference!r} is not callable")
    try:
        return factory(**dict(params))
    except TypeError as e:
        raise ValueError(f"{reference!r} with params {dict(params)}: {e}") from None
