"""Tools and environments of multi-turn episodes, without an engine: the calculator, tool calls
parsed from a turn, malformed calls as observations, tools that raise, return garbage or hang
ending their episode with a recorded reason (a hang cut at its limit), the Python tool in the
code verifier's limited process, the guessing game, observations in a chat template, and the
config's checks."""

from __future__ import annotations

import time

import pytest

from actors.environments import Calculator, GuessNumber, PythonTool, ToolEnvironment
from actors.episodes import EpisodeRunner, EpisodeSpec, ObservationFormat, Step
from orchestration.config import ConfigError, load_config
from tests.orchestration.chat_tokens import ASSISTANT, USER, E, d


class Raises:
    name, arguments, description = "boom", r".*", "raises"

    def __call__(self, argument: str) -> str:
        raise RuntimeError("the tool broke")


class Garbage:
    name, arguments, description = "junk", r".*", "returns a number, not text"

    def __call__(self, argument: str):
        return 42


class Hangs:
    name, arguments, description = "slow", r".*", "never answers"

    def __call__(self, argument: str) -> str:
        time.sleep(60)
        return "late"


@pytest.mark.unit
def test_the_calculator_evaluates_arithmetic_and_refuses_anything_else():
    calc = Calculator()
    assert calc("47+85") == "132"
    assert calc("12*(3+4)") == "84"
    assert calc("7/2") == "3.5" and calc("8/2") == "4"
    from actors.environments import BadArgument

    for bad in ("2**999999", "__import__('os')", "1/0", "3+"):
        with pytest.raises(BadArgument):
            calc(bad)


@pytest.mark.unit
def test_a_turn_without_a_call_is_the_answer_and_a_call_gets_the_result():
    env = ToolEnvironment([{"name": "calculator"}])
    assert env.stop == ("</calc>",)
    episode = env.reset({"label": "132"})
    assert episode.step("<calc>47+85</calc>") == Step("<result>132</result>", tool="calc")
    assert episode.step("132") == Step(done=True)
    # a malformed call is an observation: the episode goes on
    assert episode.step("<calc>47+x</calc>") == Step(
        "<error>bad argument for calc</error>", tool="calc"
    )
    assert episode.step("<calc>4/0</calc>") == Step("<error>division by zero</error>", tool="calc")


class Characters:
    """A stand-in tokenizer, one id per character (the subject here is the runner and the
    tools; the tiny tokenizer knows only the addition task's characters)."""

    eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids if i)


def run_turns(tokenizer, tools, turns: dict[int, str], timeout_s: float = 1.0) -> dict:
    env = ToolEnvironment([{"name": f"tests.orchestration.test_episode_tools:{t}"} for t in tools])
    spec = EpisodeSpec(environment="tools", timeout_s=timeout_s)
    runner = EpisodeRunner(env, spec, ObservationFormat(tokenizer, "tool"), [{}] * len(turns))
    for k, text in turns.items():
        runner.submit(k, tokenizer.encode(text, add_special_tokens=False), ended_with_eos=False)
    outcomes = {}
    deadline = time.monotonic() + 10
    while runner.pending and time.monotonic() < deadline:
        outcomes |= dict(runner.ready(0.05))
    return outcomes


@pytest.mark.unit
def test_tools_that_raise_return_garbage_or_hang_end_their_episode_with_the_reason():
    start = time.monotonic()
    outcomes = run_turns(
        Characters(),
        ["Raises", "Garbage", "Hangs"],
        {0: "<boom>1</boom>", 1: "<junk>1</junk>", 2: "<slow>1</slow>", 3: "3"},
        timeout_s=0.5,
    )
    assert time.monotonic() - start < 5  # the hang is cut at its 0.5 s limit, not 60 s
    assert outcomes[0].end == "boom:raised" and "the tool broke" in outcomes[0].detail
    assert outcomes[1].end == "junk:garbage"
    assert outcomes[2].end == "slow:timeout"
    assert [outcomes[k].tool for k in range(4)] == ["boom", "junk", "slow", None]  # counted
    assert outcomes[3].end == "done" and outcomes[3].observation is None


@pytest.mark.component  # child processes
def test_the_python_tool_runs_code_in_a_limited_process_and_cuts_a_hang():
    # The hang is cut at the tool's 1 s; the other programs get room (a 1 s limit cut a plain
    # failing program once in CI while other processes competed).
    tool, roomy = PythonTool(timeout_s=1.0), PythonTool(timeout_s=20.0)
    assert roomy("print(6 * 7)").strip() == "42"
    start = time.monotonic()
    out = tool("while True:\n    pass")
    assert out.endswith("[timeout]") and time.monotonic() - start < 10
    assert "Error" in roomy("raise ValueError('no')")  # a failing program says so, no fault


@pytest.mark.unit
def test_the_guessing_game_answers_higher_or_lower_until_found():
    game = GuessNumber(low=1, high=8, turn_cost=0.1)
    episode = game.reset({"label": "5"})
    assert episode.step("3") == Step(" higher\n")
    assert episode.step("7") == Step(" lower\n")
    assert episode.step("hmm") == Step(" say a number\n")
    assert episode.step("5") == Step(done=True, reward=pytest.approx(0.7))
    with pytest.raises(ValueError, match="outside"):
        game.reset({"label": "12"})


@pytest.mark.unit
def test_observations_follow_the_chat_template(chat_tokenizer):
    # template: <|role|>content<eos> per message, <|assistant|> as the generation prompt
    fmt = ObservationFormat(chat_tokenizer, "user")
    # the model ended its turn with EOS: the observation is the user turn, then the next prompt
    assert fmt.ids("3", turn_ended_with_eos=True) == [USER, *d("3"), E, ASSISTANT]
    # it stopped at a tool call's closing tag: its turn is closed first
    assert fmt.ids("3", turn_ended_with_eos=False) == [E, USER, *d("3"), E, ASSISTANT]
    assert fmt.ids([7, 8], turn_ended_with_eos=True) == [7, 8]  # ids go in as they are


@pytest.mark.unit
def test_plain_models_see_the_observation_text_as_it_is(tokenizer):
    assert ObservationFormat(tokenizer, "tool").ids("1+2", True) == d("1+2")


@pytest.mark.unit
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["episodes.environment=tools"], "needs episodes.tools"),
        (["episodes.environment=nowhere.module:Env"], "cannot import"),
        (["episodes.environment=guess_number", "episodes.params={lo: 1}"], "unexpected keyword"),
        (["episodes.environment=guess_number", "episodes.max_tokens=100"], "max_model_len"),
        (["episodes.tools=[{name: calculator}]"], "set episodes.environment=tools"),
        (
            ["episodes.environment=guess_number", "episodes.tools=[{name: calculator}]"],
            "only episodes.environment=tools calls them",
        ),
        (
            [
                "episodes.environment=guess_number",
                "reward.functions=[{name: exact_integer, column: environment}]",
            ],
            "reward component 'environment'",
        ),
        (
            [
                "episodes.environment=tools",
                "episodes.tools=[{name: python, params: {timeout_s: 5}}]",
            ],
            "leaves under a second",
        ),
        (
            [
                "episodes.environment=guess_number",
                "generator.max_model_len=64",
                "episodes.max_tokens=40",
                "reward.overlong={buffer_tokens: 40}",
            ],
            "less than episodes.max_tokens=40",
        ),
    ],
)
def test_bad_episode_configs_fail_before_any_actor(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", overrides)


class BadReward:
    stop: tuple[str, ...] = ()

    def reset(self, row):
        return self

    def step(self, turn: str) -> Step:
        return Step(" ok", reward=float("nan"))


class OutOfVocabulary(BadReward):
    def step(self, turn: str) -> Step:
        return Step([10**9])


@pytest.mark.unit
@pytest.mark.parametrize("environment", ["BadReward", "OutOfVocabulary"])
def test_an_environment_that_answers_garbage_ends_its_episode(environment):
    spec = EpisodeSpec(environment="x", timeout_s=2.0)
    env = {"BadReward": BadReward, "OutOfVocabulary": OutOfVocabulary}[environment]()
    observations = ObservationFormat(VocabularyOf(Characters(), 1000), "tool")
    runner = EpisodeRunner(env, spec, observations, [{}])
    runner.submit(0, [ord("1")], ended_with_eos=False)
    outcomes = {}
    while runner.pending:
        outcomes |= dict(runner.ready(0.05))
    assert outcomes[0].end == "environment:garbage" and outcomes[0].observation is None


class VocabularyOf:
    """:class:`Characters` with a vocabulary size."""

    def __init__(self, base, size: int):
        self.base, self.size, self.eos_token_id = base, size, 0

    def __len__(self) -> int:
        return self.size

    def __getattr__(self, name):
        return getattr(self.base, name)


@pytest.mark.unit
def test_a_stop_string_split_by_a_weight_update_is_found_in_the_turn():
    env = ToolEnvironment([{"name": "calculator"}])
    runner = EpisodeRunner(env, EpisodeSpec("tools"), ObservationFormat(Characters(), "tool"), [{}])
    assert runner.stops_in([ord(c) for c in "<calc>1+2</calc>"])
    assert not runner.stops_in([ord(c) for c in "<calc>1+2</cal"])


@pytest.mark.unit
def test_the_episode_presets_and_the_calculator_pipeline_load():
    from pathlib import Path

    import orchestration
    from orchestration import pipeline_spec

    guess = load_config("demo-guess").episodes.spec()
    assert guess.environment == "guess_number" and guess.max_turns == 4
    calc = load_config("demo-calculator").episodes.spec()
    assert calc.params["tools"] == [{"name": "calculator", "params": {}}]
    assert load_config("calculator-sft").stage == "sft"
    path = Path(orchestration.__file__).parent / "pipelines" / "calculator.yaml"
    pipeline = pipeline_spec.read_pipeline(str(path))
    assert [s.name for s in pipeline.stages] == ["sft", "rl"]
    assert pipeline.stages[1].overrides["model.path"] == "{sft.policy}"
