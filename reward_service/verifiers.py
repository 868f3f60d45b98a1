"""Rule rewards over decoded text: math answers, multiple choice, regular expressions, length.

Every reward function here has the signature ``(prompt, response, label, **params) -> float |
None``: its params are keyword-only with defaults (a config binds them through
``reward_service.rules.resolve``), and ``None`` means unscorable. Each one checks its params
before it looks at the sample, so a bad config fails on the first call with any sample (and
``resolve`` makes that first call). Standard library only.

The choices, in short:

1. Numbers are compared exactly, as ``fractions.Fraction`` (``parse_number``): ``"2.50" ==
   "5/2" == "\\frac{5}{2}"``. No float tolerance, no units, no symbolic algebra.
2. Number parsing is bounded: at most 64 digits and exponents within +-64, checked before any
   ``int()`` runs, so a policy cannot stall the scorer with ``"9" * 10**6`` or ``"1e999999"``.
3. Hedging is punished: a response that boxes (or claims) several different answers is
   unparseable, whatever the label.
4. Partial credit follows ReFT (arXiv 2401.08967): a wrong but well-formed answer earns a
   little more than no answer at all.
"""

from __future__ import annotations

import functools
import re
from fractions import Fraction
from typing import Literal

MAX_DIGITS = 64
"""``parse_number`` refuses numbers with more digits than this (all digits, both sides of the
point)."""

MAX_EXPONENT = 64
"""``parse_number`` refuses scientific notation whose exponent is larger in magnitude."""

_MAX_NUMBER_CHARS = 4 * MAX_DIGITS
"""Longer strings are refused before any regular expression sees them."""

REGEX_MAX_CHARS = 100_000
"""``regex_match`` searches at most this many characters of a response (its start)."""

AnswerStyle = Literal["auto", "boxed", "hash", "last_number"]
_STYLES = ("auto", "boxed", "hash", "last_number")


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------

# One unsigned decimal: "1234", "1,234,567" (strict groups of three), ".5", "2.50", "1.5e-3".
_DECIMAL = re.compile(
    r"(?P<int>\d{1,3}(?:,\d{3})+|\d*)(?:\.(?P<frac>\d+))?(?:[eE](?P<exp>[+-]?\d+))?"
)
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{(?P<num>[^{}]*)\}\s*\{(?P<den>[^{}]*)\}")
_SIGNS = {"+": 1, "-": -1, "\u2212": -1}  # U+2212 is the typographic minus sign


def parse_number(text: str) -> Fraction | None:
    """The exact value of ``text`` if it is one number, else None.

    Accepted, after stripping surrounding whitespace and one trailing period (``"5."``):

    - a sign ``+``, ``-`` or ``\u2212``, before or after a leading ``$`` (or LaTeX ``\\$``);
    - an integer or decimal, with optional thousands commas in strict groups of three
      (``"1,234.5"``; ``"1,23"`` is refused), optionally in scientific notation (``"1.5e3"``);
    - a simple fraction of two such numbers, ``"3/4"`` (the denominator unsigned);
    - LaTeX ``\\frac{3}{4}``, ``\\dfrac`` or ``\\tfrac`` (the numerator may carry a sign);
    - a trailing ``%`` (or ``\\%``), which is simply dropped: ``"50%" == 50``, not 0.5, since
      labels write percentages as the bare number.

    Refused (None): more than ``MAX_DIGITS`` digits, an exponent beyond +-``MAX_EXPONENT``, a zero
    denominator, anything else (units, words, several numbers). The work is bounded by the
    length caps, whatever the input.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_number takes a str, not {type(text).__name__}")
    s = text.strip()
    if len(s) > _MAX_NUMBER_CHARS:
        return None
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()
    if s.endswith("\\%"):
        s = s[:-2].rstrip()
    elif s.endswith("%"):
        s = s[:-1].rstrip()
    sign, s = _strip_sign_and_dollar(s)
    if not s:
        return None
    frac = _LATEX_FRAC.fullmatch(s)
    if frac is not None:
        num_sign, num_text = _strip_sign_and_dollar(frac["num"].strip(), dollar=False)
        num, den = _parse_decimal(num_text), _parse_decimal(frac["den"].strip())
        if num is None or den is None or den == 0:
            return None
        return sign * num_sign * num / den
    if s.count("/") == 1:
        num_text, den_text = s.split("/")
        num, den = _parse_decimal(num_text.strip()), _parse_decimal(den_text.strip())
        if num is None or den is None or den == 0:
            return None
        return sign * num / den
    value = _parse_decimal(s)
    return None if value is None else sign * value


def _strip_sign_and_dollar(s: str, *, dollar: bool = True) -> tuple[int, str]:
    """``(sign, rest)``: at most one leading sign, with an optional ``$``/``\\$`` on either side
    of it (``"-$5"``, ``"$-5"``)."""
    sign, signed = 1, False
    for _ in range(2):
        if not signed and s[:1] in _SIGNS:
            sign, signed, s = _SIGNS[s[0]], True, s[1:].lstrip()
        elif dollar and s.startswith(("$", "\\$")):
            s, dollar = s[1 if s[0] == "$" else 2 :].lstrip(), False
    return sign, s


def _parse_decimal(s: str) -> Fraction | None:
    """An unsigned decimal within the digit and exponent bounds (see ``_DECIMAL``), or None."""
    m = _DECIMAL.fullmatch(s)
    if m is None or not (m["int"] or m["frac"]):
        return None
    digits = len(m["int"].replace(",", "")) + len(m["frac"] or "")
    if digits > MAX_DIGITS:
        return None
    exponent = 0
    if m["exp"] is not None:
        if len(m["exp"].lstrip("+-")) > 3:  # bounded before int() sees it
            return None
        exponent = int(m["exp"])
        if abs(exponent) > MAX_EXPONENT:
            return None
    mantissa = Fraction(f"{m['int'].replace(',', '') or '0'}.{m['frac'] or '0'}")
    return mantissa * Fraction(10) ** exponent


# A number token inside running text, for "####" answers and "last_number"; the sign only where
# it cannot be a binary minus ("5-3" has the token "3", not "-3").
# The digits cannot start inside a longer run ("(?<![\d.,])"): that, not just the trailing
# look-ahead, keeps findall linear on a long run of digits.
_NUMBER_TOKEN = re.compile(
    r"(?:(?<![\w)\]}])[-+\u2212])?\\?\$?(?<![\d.,])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
    r"(?:/\d+(?:\.\d+)?)?(?:[eE][-+]?\d+)?%?(?![,.]?\d)"
)
# Text that is shaped like a number even if parse_number refuses it (too many digits, say).
# Written without two adjacent quantifiers over the same characters, so it stays linear.
_NUMBER_SHAPED = re.compile(
    r"(?=.*\d)[-+\u2212]?\\?\$?[-+\u2212]?(?:[\d,]+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?\\?%?\.?"
)


def _is_number_shaped(text: str) -> bool:
    return _NUMBER_SHAPED.fullmatch(text.strip()) is not None


# ---------------------------------------------------------------------------------------------
# Final answers
# ---------------------------------------------------------------------------------------------

_BOX_TOKEN = re.compile(r"\\(?:boxed|fbox)\s*\{|\\[{}]|[{}]")


def extract_boxed(text: str) -> list[str]:
    """The contents of every outermost ``\\boxed{...}`` and ``\\fbox{...}`` in ``text``, in order.

    Braces nest (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``); escaped braces ``\\{`` and
    ``\\}`` do not count. A box whose brace never closes is ignored, as is a box inside another
    box (only the outer one is returned). One pass over the text: linear in its length.
    """
    stack: list[int | None] = []  # per open brace: where a box's contents start, else None
    spans: list[tuple[int, int]] = []
    for m in _BOX_TOKEN.finditer(text):
        token = m.group()
        if token.startswith(("\\boxed", "\\fbox")):
            stack.append(m.end())
        elif token == "{":
            stack.append(None)
        elif token == "}" and stack:
            start = stack.pop()
            if start is not None:
                spans.append((start, m.start()))
    spans.sort()
    outermost: list[tuple[int, int]] = []
    for start, end in spans:
        if not outermost or start >= outermost[-1][1]:
            outermost.append((start, end))
    return [text[start:end] for start, end in outermost]


def _normalise_text(text: str) -> str:
    """Comparable form of a non-numeric answer: no whitespace, ``$`` or trailing period."""
    s = re.sub(r"\s+", "", text).replace("\\$", "").replace("$", "")
    return s.rstrip(".")


def _answer_key(text: str) -> Fraction | str:
    value = parse_number(text)
    return value if value is not None else _normalise_text(text)


def extract_final_answer(response: str, style: AnswerStyle = "auto") -> str | None:
    """The final answer written in ``response`` (stripped), or None when there is none.

    Styles:

    - ``"boxed"``: the content of the boxes (``extract_boxed``). Several boxes are fine when
      they agree (numerically, or as normalised text); boxes that differ give None, so a policy
      cannot hedge by boxing every candidate. The last box is returned.
    - ``"hash"``: GSM8K's ``#### answer``: the text after the last ``####`` up to the end of that
      line; when it starts with a number (``"#### 7 apples."``) just that number (``"7"``).
    - ``"last_number"``: the last number token anywhere in the text. Opt-in only: it rewards a
      response that merely ends with the right number.
    - ``"auto"``: ``"boxed"`` when the response has a box (even a hedged one: no fallback),
      else ``"hash"`` when it has ``####``, else None. Never ``"last_number"``, for the reason
      above.

    Raises:
        ValueError: an unknown ``style``.
    """
    _check_style(style)
    if style == "auto":
        if extract_boxed(response):
            style = "boxed"
        elif "####" in response:
            style = "hash"
        else:
            return None
    if style == "boxed":
        boxes = [b.strip() for b in extract_boxed(response)]
        if not boxes or len({_answer_key(b) for b in boxes}) > 1:
            return None
        return boxes[-1]
    if style == "hash":
        _, sep, tail = response.rpartition("####")
        if not sep:
            return None
        line = tail.split("\n", 1)[0].strip()
        token = _NUMBER_TOKEN.match(line)
        if token is not None:
            return token.group()
        return line or None
    tokens = _NUMBER_TOKEN.findall(response)
    return tokens[-1] if tokens else None


def _check_style(style: str) -> None:
    if style not in _STYLES:
        raise ValueError(f"unknown answer style {style!r}; use one of {', '.join(_STYLES)}")


# ---------------------------------------------------------------------------------------------
# Reward functions
# ---------------------------------------------------------------------------------------------


def math_answer(
    prompt: str,
    response: str,
    label: str | None,
    *,
    correct: float = 1.0,
    wrong: float = 0.1,
    unparseable: float = 0.0,
    style: AnswerStyle = "auto",
) -> float | None:
    """ReFT-style partial credit (arXiv 2401.08967) for a final answer checked against the label.

    The answer comes from ``extract_final_answer(response, style)``. When both it and the label
    are numbers (``parse_number``) they are compared exactly; otherwise their normalised text
    (no whitespace, ``$`` or trailing period) is compared, so ``\\frac{\\pi}{2}`` can match
    itself. Returns ``correct`` / ``wrong``, or ``unparseable`` when there is no answer, the
    answer is empty, or it is shaped like a number that ``parse_number`` refuses (a 5,000-digit
    answer is unparseable, not wrong).

    Unscorable (None): no label, or a label that is empty or an unparseable number itself.

    Raises:
        ValueError: an unknown ``style``.
    """
    _check_style(style)
    if label is None:
        return None
    expected = _answer_key(label)
    if expected == "" or (isinstance(expected, str) and _is_number_shaped(label)):
        return None
    answer = extract_final_answer(response, style)
    if answer is None:
        return unparseable
    got = _answer_key(answer)
    if got == "" or (isinstance(got, str) and _is_number_shaped(answer)):
        return unparseable
    if isinstance(got, Fraction) != isinstance(expected, Fraction):
        # one side is a number: compare the texts (label "x+1" vs answer "5" is simply wrong)
        got, expected = _normalise_text(answer), _normalise_text(label)
    return correct if got == expected else wrong


# These run on text whose whitespace runs were collapsed to one space: no two adjacent
# quantifiers can then trade a long run of spaces between them (quadratic backtracking).
_MC_TEXT = re.compile(r"\\text(?:bf)?\{([^{}]*)\}")
_MC_ALONE = re.compile(r"\(? ?\**([A-Z])\**\)?[.):]?")
_MC_LETTER = r"\(?\**[A-Z]\b\**\)?"
_MC_PHRASE = re.compile(
    r"\b(?i:answer|option|choice)s?(?: (?i:is|would be|should be|will be) ?:?| ?:) ?"
    rf"(?P<list>{_MC_LETTER}(?: ?(?:,|/|&|and|or) ?{_MC_LETTER})*)"
)
_MC_LEADING = re.compile(r"\(?([A-Z])[).:](?: |$)")


def _claimed_letters(response: str, choices: str) -> set[str]:
    """The letters of ``choices`` that ``response`` claims as its answer, from the first kind of
    claim it makes (later kinds are not looked at).

    1. Boxes holding one letter: ``\\boxed{B}``, ``\\boxed{(B)}``, ``\\boxed{\\text{B}}``.
    2. Answer phrases: "answer", "option" or "choice" (any case, optional plural) followed by
       ``:`` or by "is", "would be", "should be", "will be", then a letter: ``Answer: B``,
       ``The answer is (C).``, ``the correct option is **D**``. A list after the phrase,
       ``Answer: A, C`` or ``answer is A or B``, claims every letter in it.
    3. The whole response is one letter: ``B``, ``(B)``, ``B)``, ``B.``, ``**B**``.
    4. The response starts with a letter and ``)``, ``.`` or ``:``: ``B) because ...``.

    Letters must be upper case (``"the answer is a"`` claims nothing).
    """
    allowed = set(choices)
    boxes = [" ".join(_MC_TEXT.sub(r"\1", b).split()) for b in extract_boxed(response)]
    letters = {m[1] for b in boxes if (m := _MC_ALONE.fullmatch(b))} & allowed
    if letters:
        return letters
    text = " ".join(response.split())
    for m in _MC_PHRASE.finditer(text):
        letters.update(re.findall(r"[A-Z]", m["list"]))
    letters &= allowed
    if letters:
        return letters
    m = _MC_ALONE.fullmatch(text) or _MC_LEADING.match(text)
    return {m[1]} & allowed if m is not None else set()


def multiple_choice(
    prompt: str,
    response: str,
    label: str | None,
    *,
    choices: str = "ABCD",
    correct: float = 1.0,
    wrong: float = 0.0,
    unparseable: float = 0.0,
) -> float | None:
    """Scores the option letter a response picks against the label's letter.

    What counts as picking a letter is listed in ``_claimed_letters`` (boxed letters first, then
    answer phrases, then a bare letter). Letters outside ``choices`` are ignored. Returns
    ``correct`` / ``wrong`` for exactly one claimed letter, ``unparseable`` for none or for
    several different ones (hedging).

    Unscorable (None): no label, or a label that is not one of ``choices`` (``"B"``, ``" b "``
    and ``"(B)"`` all name B).

    Raises:
        ValueError: ``choices`` is not a string of distinct upper-case letters.
    """
    if not choices or not re.fullmatch(r"[A-Z]+", choices) or len(set(choices)) != len(choices):
        raise ValueError(f"choices must be distinct upper-case letters, got {choices!r}")
    if label is None:
        return None
    expected = label.strip().strip("()").strip().upper()
    if len(expected) != 1 or expected not in choices:
        return None
    letters = _claimed_letters(response, choices)
    if len(letters) != 1:
        return unparseable
    return correct if letters == {expected} else wrong


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """``re.compile(pattern)``, cached.

    Raises:
        ValueError: the pattern does not compile; the message names it.
    """
    if not isinstance(pattern, str):
        raise ValueError(f"regex pattern must be a str, got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"bad regex pattern {pattern!r}: {e}") from e


def regex_match(
    prompt: str,
    response: str,
    label: str | None,
    *,
    pattern: str,
    full: bool = False,
    match: float = 1.0,
    miss: float = 0.0,
) -> float:
    """``match`` when ``pattern`` is found in the response (``re.search``), else ``miss``; with
    ``full``, the whole response must match (``re.fullmatch``). The label is not used.

    Only the first ``REGEX_MAX_CHARS`` characters are searched; with ``full`` a longer response
    is a ``miss`` (it cannot be checked whole). The cap bounds the input, not the pattern:
    a pattern that backtracks catastrophically is the config's problem.

    Raises:
        ValueError: the pattern does not compile; the message names it.
    """
    compiled = compile_pattern(pattern)
    if full:
        if len(response) > REGEX_MAX_CHARS:
            return miss
        return match if compiled.fullmatch(response) else miss
    return match if compiled.search(response[:REGEX_MAX_CHARS]) else miss


def length_in_range(
    prompt: str,
    response: str,
    label: str | None,
    *,
    min_chars: int = 0,
    max_chars: int,
    inside: float = 1.0,
    outside: float = 0.0,
) -> float:
    """``inside`` when ``min_chars <= len(response) <= max_chars`` (characters of the decoded
    response, whitespace included), else ``outside``. The label is not used.

    Raises:
        ValueError: ``min_chars`` negative or above ``max_chars``.
    """
    if not 0 <= min_chars <= max_chars:
        raise ValueError(f"need 0 <= min_chars <= max_chars, got {min_chars} and {max_chars}")
    return inside if min_chars <= len(response) <= max_chars else outside
