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

**Limits**: every ``reset`` and ``step`` runs in its own thread and is given ``timeout_s``; one that
raises, hangs past its limit or returns something that is not a :class:`Step` (a tool that
returns something that is not text) ends its episode, which records why
(``episode_end``: ``<tool or environment>:raised|timeout|garbage``); the run goes on. A hung call's
thread is abandoned, not killed (Python cannot kill a thread): a tool that runs code of its own
runs it in a limited child process (``actors.environments.PythonTool``). Episodes end at
``max_turns`` model turns and ``max_tokens`` response tokens (model and observation together).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
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
        """The tokens to append after the model's turn; token ids are appended as they are."""
        if not isinstance(observation, str):
            return [int(t) for t in observation]
        if not self.chat:
            text = observation
        else:
            close = self.close_after_eos if turn_ended_with_eos else self.close
            text = close + self.before + observation + self.after
        return list(self.tokenizer.encode(text, add_special_tokens=False))


class EpisodeRunner:
    """The environment side of a batch of episodes, one per sample ``k``, for the engine loop.

    ``submit(k, turn_ids)`` hands the model's finished turn to the episode's ``step`` in a
    thread of its own (the engine keeps generating the other episodes meanwhile);
    ``ready(wait_s)`` returns the outcomes that arrived, and a timeout outcome for each call
    past its limit."""

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
        self._done: queue.Queue[tuple[int, int, Outcome]] = queue.Queue()
        self._deadlines: dict[int, tuple[float, int]] = {}  # k -> (deadline, call number)
        self._calls = 0

    @property
    def pending(self) -> bool:
        return bool(self._deadlines)

    def submit(self, k: int, turn_ids: Sequence[int]) -> None:
        self._calls += 1
        call = self._calls
        self._deadlines[k] = (time.monotonic() + self.spec.timeout_s, call)
        ended_with_eos = bool(turn_ids) and turn_ids[-1] == self.observations.eos
        text = self.observations.tokenizer.decode(list(turn_ids), skip_special_tokens=True)

        def work() -> None:
            try:
                outcome = self._step(k, text, ended_with_eos)
            except Fault as fault:
                outcome = Outcome(None, end=fault.end, detail=str(fault))
            except Exception as e:  # noqa: BLE001 - user code: recorded as the episode's end
                outcome = Outcome(None, end=f"{self._hung(k)}:raised", detail=f"{e!r:.200}")
            self._done.put((k, call, outcome))

        threading.Thread(target=work, name=f"episode-{k}", daemon=True).start()

    def _step(self, k: int, text: str, ended_with_eos: bool) -> Outcome:
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
            raise Fault(ENVIRONMENT, "garbage", f"reward {step.reward!r}") from None
        if step.done or step.observation is None:
            return Outcome(None, reward, step.tool, end="done")
        ids = self.observations.ids(step.observation, ended_with_eos)
        return Outcome(ids, reward, step.tool)

    def ready(self, wait_s: float) -> list[tuple[int, Outcome]]:
        """Outcomes that arrived (waiting up to ``wait_s`` for a first one), and a timeout for
        every call past its limit (its thread is abandoned; a late answer is dropped)."""
        out = []
        deadline = time.monotonic() + wait_s
        while True:
            try:
                k, call, outcome = self._done.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if self._deadlines.get(k, (0.0, -1))[1] == call:  # not timed out meanwhile
                del self._deadlines[k]
                out.append((k, outcome))
            if self._done.empty():
                break
        now = time.monotonic()
        hung = False
        for k, (limit, _) in list(self._deadlines.items()):
            if now >= limit:
                del self._deadlines[k]
                who = self._hung(k)
                out.append((k, Outcome(None, end=f"{who}:timeout")))
                hung = True
        restart = getattr(self.environment, "restart", None)
        if hung and restart is not None:  # in its own process: the hung call is killed
            restart()
        return out

    def _hung(self, k: int) -> str:
        """Who to blame for episode ``k``'s call: the tool it is calling, or the environment."""
        episode = self.episodes.get(k)
        return getattr(episode, "tool_in_call", None) or ENVIRONMENT

    def next_wait(self) -> float:
        """Seconds until the first pending call's limit."""
        if not self._deadlines:
            return 0.0
        return max(0.0, min(d for d, _ in self._deadlines.values()) - time.monotonic())


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
