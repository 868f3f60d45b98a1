"""Built-in environments and tools for multi-turn episodes (the interfaces: ``actors.episodes``).

- ``tools``: :class:`ToolEnvironment`, the model calls tools by writing ``<name>argument</name>``
  and reads ``<result>...</result>``; a turn without a call is the final answer. Its tools:
  ``calculator`` (:class:`Calculator`, arithmetic on numbers) and ``python``
  (:class:`PythonTool`, a program run in the code verifier's limited child process,
  ``reward_service.code_verifier.run_untrusted``), or ``package.module:object``.
- ``guess_number``: :class:`GuessNumber`, a game over several turns: the model guesses, the
  environment answers ``higher`` or ``lower`` until the guess is right.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Mapping, Sequence
from typing import Any

from actors.episodes import EpisodeSpec, Fault, Step, Tool, resolve_object


class BadArgument(ValueError):
    """A tool call the tool cannot take (the model's mistake): it becomes an ``<error>``
    observation and the episode goes on."""


# ------------------------------------------------------------------------------------ tools


_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


class Calculator:
    """Arithmetic: ``+ - * / // %``, parentheses and unary minus on integers and decimals
    (no names, no calls, no powers: nothing can run long). Integers come back as integers."""

    name = "calc"
    arguments = r"[0-9+\-*/%(). ]{1,64}"
    description = "evaluates an arithmetic expression: <calc>12*(3+4)</calc>"

    def __call__(self, argument: str) -> str:
        try:
            tree = ast.parse(argument.strip(), mode="eval")
        except SyntaxError:
            raise BadArgument(f"not an expression: {argument!r}") from None
        try:
            value = self._eval(tree.body)
        except ZeroDivisionError:
            raise BadArgument("division by zero") from None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return str(value)

    def _eval(self, node: ast.AST) -> int | float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = self._eval(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](self._eval(node.left), self._eval(node.right))
        raise BadArgument(f"unsupported: {ast.unparse(node)!r}")


class PythonTool:
    """Runs the argument as a Python program in a limited child process (the code verifier's:
    wall-clock and CPU time, address space, no network where the kernel allows) and returns
    the end of its output; a program that fails or runs out of time says so in its result."""

    name = "python"
    arguments = r"(?s).{1,4000}"
    description = "runs a Python program and returns its output: <python>print(2**10)</python>"

    def __init__(self, timeout_s: float = 3.0, memory_mib: int = 256, output_chars: int = 400):
        self.timeout_s, self.memory_mib, self.output_chars = timeout_s, memory_mib, output_chars

    def __call__(self, argument: str) -> str:
        from reward_service.code_verifier import run_untrusted

        result = run_untrusted(
            argument, timeout_s=self.timeout_s, memory_mib=self.memory_mib, output_bytes=4096
        )
        if result.status == "error":  # the child could not start: the tool is broken
            raise RuntimeError(f"python tool could not start a process: {result.output}")
        output = result.output[-self.output_chars :]
        if result.status in ("passed", "failed"):
            return output
        return f"{output}\n[{result.status}]".strip()


TOOLS = {"calculator": Calculator, "python": PythonTool}
"""Built-in tools by config name."""


class _ToolEpisode:
    _RESULT = "<result>{}</result>"
    _ERROR = "<error>{}</error>"

    def __init__(self, tools: Mapping[str, Tool]):
        self.tools = tools
        self.tool_in_call: str | None = None  # blamed if the call hangs
        self._call = re.compile("<(" + "|".join(map(re.escape, tools)) + r")>(.*?)</\1>", re.DOTALL)

    def step(self, turn: str) -> Step:
        calls = list(self._call.finditer(turn))
        if not calls:
            return Step(done=True)  # no call: the turn is the answer
        name, argument = calls[-1].group(1), calls[-1].group(2)
        tool = self.tools[name]
        if not re.fullmatch(tool.arguments, argument):
            return Step(self._ERROR.format(f"bad argument for {name}"), tool=name)
        self.tool_in_call = name
        try:
            result = tool(argument)
        except BadArgument as e:
            return Step(self._ERROR.format(e), tool=name)
        except Exception as e:  # noqa: BLE001 - a broken tool ends the episode, not the run
            raise Fault(name, "raised", repr(e)[:200]) from None
        finally:
            self.tool_in_call = None
        if not isinstance(result, str):
            raise Fault(name, "garbage", f"returned {type(result).__name__}, not text")
        return Step(self._RESULT.format(result), tool=name)


class ToolEnvironment:
    """The model's turns may call tools: ``<name>argument</name>`` ends the turn (a stop
    string), the tool runs, and ``<result>...</result>`` (or ``<error>...</error>`` for a call
    the tool cannot take) is the observation. A turn without a call ends the episode; the
    reward functions then score that last turn. No reward of its own.

    Args:
        tools: ``[{name, params}]``: a built-in (:data:`TOOLS`) or ``package.module:object``,
            called with ``params``, giving a :class:`actors.episodes.Tool`.
    """

    def __init__(self, tools: Sequence[Mapping[str, Any]]):
        if not tools:
            raise ValueError("the tools environment needs at least one tool")
        made: dict[str, Tool] = {}
        for entry in tools:
            tool = resolve_object(entry["name"], TOOLS, entry.get("params") or {})
            if not isinstance(tool, Tool):
                raise ValueError(
                    f"tool {entry['name']!r} gives a {type(tool).__name__}, which lacks name, "
                    "arguments, description or __call__"
                )
            if not re.fullmatch(r"[A-Za-z_][\w-]*", tool.name) or tool.name in made:
                raise ValueError(f"tool name {tool.name!r}: a word, unique among the tools")
            re.compile(tool.arguments)
            made[tool.name] = tool
        self.tools = made
        self.stop = tuple(f"</{name}>" for name in made)

    def reset(self, row: Mapping[str, Any]) -> _ToolEpisode:
        return _ToolEpisode(self.tools)


# ------------------------------------------------------------------------------ a game


class GuessNumber:
    """Guess the secret number (the row's ``label``) between ``low`` and ``high``: after each
    guess the environment answers ``higher``, ``lower`` or ends the episode. The reward, at the
    end, is 1 for finding it, less ``turn_cost`` per guess before; a turn with no number gets
    ``say a number``."""

    stop: tuple[str, ...] = ()

    def __init__(self, low: int = 1, high: int = 8, turn_cost: float = 0.1):
        if low >= high:
            raise ValueError(f"guess_number: low={low} must be below high={high}")
        self.low, self.high, self.turn_cost = low, high, turn_cost

    def reset(self, row: Mapping[str, Any]) -> _Guessing:
        try:
            secret = int(str(row.get("label")).strip())
        except ValueError:
            label = row.get("label")
            raise ValueError(f"guess_number: the row's label {label!r} is not a number") from None
        if not self.low <= secret <= self.high:
            raise ValueError(f"guess_number: secret {secret} outside {self.low}..{self.high}")
        return _Guessing(self, secret)


class _Guessing:
    _NUMBER = re.compile(r"-?\d+")

    def __init__(self, game: GuessNumber, secret: int):
        self.game, self.secret, self.guesses = game, secret, 0

    def step(self, turn: str) -> Step:
        self.guesses += 1
        found = self._NUMBER.findall(turn)
        if not found:
            return Step(" say a number\n")
        guess = int(found[-1])
        if guess == self.secret:
            return Step(done=True, reward=1.0 - self.game.turn_cost * (self.guesses - 1))
        return Step(" higher\n" if guess < self.secret else " lower\n")


BUILTIN = {"tools": ToolEnvironment, "guess_number": GuessNumber}
"""Built-in environments by config name."""


def make_environment(spec: EpisodeSpec):
    """The environment ``spec`` names, with its params (``ValueError`` for a bad one)."""
    from actors.episodes import Environment

    environment = resolve_object(spec.environment, BUILTIN, spec.params)
    if not isinstance(environment, Environment):
        raise ValueError(
            f"environment {spec.environment!r} gives a {type(environment).__name__}, which "
            "lacks stop or reset"
        )
    return environment
