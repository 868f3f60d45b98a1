"""CPU tests for the rule rewards in reward_service.verifiers and their binding by resolve()."""

import functools
import time
from fractions import Fraction

import pytest

from reward_service.rules import resolve
from reward_service.verifiers import (
    compile_pattern,
    extract_boxed,
    extract_final_answer,
    length_in_range,
    math_answer,
    multiple_choice,
    parse_number,
    regex_match,
)

pytestmark = pytest.mark.unit  # pure code in this process

HUGE = "9" * 5000


# ------------------------------------------------------------------------------------------
# parse_number
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("42", Fraction(42)),
        ("  42 \n", Fraction(42)),
        ("+7", Fraction(7)),
        ("-7", Fraction(-7)),
        ("\u22127", Fraction(-7)),  # typographic minus
        ("1,234", Fraction(1234)),
        ("1,234,567.5", Fraction(2469135, 2)),
        ("$1,000.00", Fraction(1000)),
        ("-$5", Fraction(-5)),
        ("$-5", Fraction(-5)),
        ("\\$12", Fraction(12)),
        ("50%", Fraction(50)),  # the percent sign is dropped, not divided by 100
        ("12.5\\%", Fraction(25, 2)),
        ("2.50", Fraction(5, 2)),
        (".5", Fraction(1, 2)),
        ("5.", Fraction(5)),  # a trailing period ends the sentence
        ("3/4", Fraction(3, 4)),
        ("-3/4", Fraction(-3, 4)),
        ("1.5/3", Fraction(1, 2)),
        ("\\frac{3}{4}", Fraction(3, 4)),
        ("\\dfrac{3}{4}", Fraction(3, 4)),
        ("\\tfrac {1}{ 8 }", Fraction(1, 8)),
        ("-\\frac{3}{4}", Fraction(-3, 4)),
        ("\\frac{-3}{4}", Fraction(-3, 4)),
        ("1e5", Fraction(100000)),
        ("1.5E-3", Fraction(3, 2000)),
        ("2e+2", Fraction(200)),
        ("1e64", Fraction(10**64)),
        ("9" * 64, Fraction(int("9" * 64))),  # exactly MAX_DIGITS
        # refused
        ("9" * 65, None),
        (HUGE, None),
        ("1e65", None),
        ("1e999999", None),
        ("1e" + "9" * 5000, None),
        ("1,23", None),  # not groups of three: a list, not a number
        ("12,3456", None),
        ("3/0", None),
        ("\\frac{1}{0}", None),
        ("+-5", None),
        ("--5", None),
        ("", None),
        (".", None),
        ("5..", None),
        ("$", None),
        ("7 apples", None),
        ("1 2", None),
        ("x", None),
        ("1/2/3", None),
        ("\\frac{\\pi}{2}", None),
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize("text", [HUGE, "1e999999", "9" * 10**6, "1," * 10**5 + "1", " " * 10**6])
def test_parse_number_refuses_huge_inputs_quickly(text):
    start = time.perf_counter()
    assert parse_number(text) is None
    assert time.perf_counter() - start < 0.1


def test_parse_number_rejects_non_strings():
    with pytest.raises(TypeError, match="parse_number takes a str, not int"):
        parse_number(5)


# ------------------------------------------------------------------------------------------
# extract_boxed / extract_final_answer
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\boxed{5}", ["5"]),
        ("so \\boxed{ 5 } and \\fbox{6}", [" 5 ", "6"]),
        ("\\boxed{\\frac{1}{2}}", ["\\frac{1}{2}"]),  # nested braces
        ("\\boxed{{a}{b{c}}}", ["{a}{b{c}}"]),
        ("\\boxed {7}", ["7"]),
        ("\\boxed{\\{1, 2\\}}", ["\\{1, 2\\}"]),  # escaped braces do not count
        ("\\boxed{5", []),  # never closed: ignored
        ("\\boxed{5 \\boxed{6}", ["6"]),  # the unclosed outer one is ignored, the inner kept
        ("\\boxed{\\boxed{6}}", ["\\boxed{6}"]),  # only the outermost
        ("} \\boxed{1} }", ["1"]),  # stray closing braces
        ("no box {here}", []),
        ("\\boxed 5", []),  # the brace-less shorthand is not supported
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_boxed_is_linear_on_unclosed_boxes():
    text = "\\boxed{" * 20_000
    start = time.perf_counter()
    assert extract_boxed(text) == []
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    ("response", "style", "expected"),
    [
        ("The answer is \\boxed{42}.", "boxed", "42"),
        ("\\boxed{42} ... so \\boxed{42}", "boxed", "42"),  # repeated, same answer: fine
        ("\\boxed{0.5} or \\boxed{\\frac{1}{2}}", "boxed", "\\frac{1}{2}"),  # same value
        ("\\boxed{42} or maybe \\boxed{43}", "boxed", None),  # hedging
        ("\\boxed{x+1} \\boxed{x + 1}", "boxed", "x + 1"),  # same text up to whitespace
        ("no box", "boxed", None),
        ("#### 7", "hash", "7"),
        ("work\n#### 7 apples.\nmore text", "hash", "7"),
        ("#### 1,000.", "hash", "1,000"),
        ("#### $1,000.00 total", "hash", "$1,000.00"),
        ("#### -3", "hash", "-3"),
        ("#### 3.5.", "hash", "3.5"),
        ("#### 1 \n#### 2", "hash", "2"),  # the last one
        ("#### x = 5", "hash", "x = 5"),  # no leading number: the whole line
        ("####   \n", "hash", None),
        ("no marker", "hash", None),
        ("3 apples and then 4.5.", "last_number", "4.5"),
        ("it is -7", "last_number", "-7"),
        ("5-3", "last_number", "3"),  # a binary minus is not a sign
        ("1,000 people", "last_number", "1,000"),
        ("no digits", "last_number", None),
        # auto: boxed, else ####, else None (never the last number)
        ("\\boxed{1}\n#### 2", "auto", "1"),
        ("\\boxed{1} \\boxed{3}\n#### 2", "auto", None),  # a hedge does not fall back to ####
        ("#### 2", "auto", "2"),
        ("the answer is 2", "auto", None),
    ],
)
def test_extract_final_answer(response, style, expected):
    assert extract_final_answer(response, style) == expected


def test_extract_final_answer_last_number_is_linear():
    text = "9" * 100_000 + ",5"
    start = time.perf_counter()
    extract_final_answer(text, "last_number")
    assert time.perf_counter() - start < 1.0


def test_extract_final_answer_unknown_style():
    with pytest.raises(ValueError, match="unknown answer style 'latex'; use one of auto, boxed"):
        extract_final_answer("\\boxed{1}", "latex")


# ------------------------------------------------------------------------------------------
# math_answer
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "label", "expected"),
    [
        ("\\boxed{72}", "72", 1.0),
        ("so \\boxed{72}.", "72.0", 1.0),
        ("\\boxed{73}", "72", 0.1),  # wrong but well-formed: ReFT partial credit
        ("72", "72", 0.0),  # no box, no ####: auto finds no answer
        ("\\boxed{\\$1,000.00}", "1000", 1.0),
        ("#### $1,000.00", "1000", 1.0),
        ("#### 1,000", "1000", 1.0),
        ("#### 7 apples.", "7", 1.0),
        ("\\boxed{\\frac{3}{4}}", "0.75", 1.0),
        ("\\boxed{3/4}", "\\frac{3}{4}", 1.0),
        ("\\boxed{-5}", "-5", 1.0),
        ("\\boxed{-5}", "5", 0.1),
        ("\\boxed{50\\%}", "50", 1.0),
        ("\\boxed{5} \\boxed{5.00}", "5", 1.0),  # several identical boxes are fine
        ("\\boxed{5} \\boxed{6}", "5", 0.0),  # several different ones: unparseable
        ("\\boxed{5} \\boxed{6}", "6", 0.0),
        ("\\boxed{}", "5", 0.0),
        ("\\boxed{" + HUGE + "}", "9", 0.0),  # refused as a number: unparseable, not wrong
        ("\\boxed{1e999999}", "1", 0.0),
        ("\\boxed{seven}", "7", 0.1),  # an answer, not a number: compared as text
        ("\\boxed{\\frac{\\pi}{2}}", "\\frac{\\pi}{2}", 1.0),  # text on both sides
        ("\\boxed{ x + 1 }", "x+1", 1.0),
        ("\\boxed{x+2}", "x+1", 0.1),
        ("\\boxed{5}", "x+1", 0.1),
        # unscorable labels
        ("\\boxed{5}", None, None),
        ("\\boxed{5}", "  ", None),
        ("\\boxed{5}", HUGE, None),
        ("\\boxed{5}", "1e999999", None),
    ],
)
def test_math_answer(response, label, expected):
    assert math_answer("q", response, label) == expected


def test_math_answer_params_and_styles():
    assert math_answer("q", "\\boxed{3}", "4", correct=2.0, wrong=-1.0) == -1.0
    assert math_answer("q", "nothing", "4", unparseable=-0.5) == -0.5
    assert math_answer("q", "we get 4 in the end", "4", style="last_number") == 1.0
    assert math_answer("q", "we get 4 in the end", "4", style="auto") == 0.0
    with pytest.raises(ValueError, match="unknown answer style"):
        math_answer("q", "\\boxed{4}", None, style="nope")  # checked before the label


def test_math_answer_huge_response_is_quick():
    start = time.perf_counter()
    assert math_answer("q", "\\boxed{" + "9" * 10**6 + "}", "9") == 0.0
    assert math_answer("q", "#### " + "9" * 10**6, "9") == 0.0
    assert time.perf_counter() - start < 1.0


# ------------------------------------------------------------------------------------------
# multiple_choice
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("B", 1.0),
        (" (B) ", 1.0),
        ("B)", 1.0),
        ("B.", 1.0),
        ("**B**", 1.0),
        ("Answer: B", 1.0),
        ("answer:B", 1.0),
        ("The answer is (B).", 1.0),
        ("The correct option is **B**.", 1.0),
        ("Reasoning...\nThe final answer is B because it is largest.", 1.0),
        ("\\boxed{B}", 1.0),
        ("\\boxed{(B)}", 1.0),
        ("\\boxed{\\text{B}}", 1.0),
        ("B) because the others are wrong", 1.0),
        ("Option A is wrong. The answer is B", 1.0),  # "option A" is no claim without is/:
        ("\\boxed{B} although the answer is C", 1.0),  # boxes come first
        ("The answer is C", 0.0),
        ("The answer is (C).", 0.0),
        # several letters claimed: unparseable
        ("Answer: A, B", 0.0),
        ("The answer is A or B", 0.0),
        ("answer: B/C", 0.0),
        ("The answer is B. No wait, the answer is C.", 0.0),
        ("\\boxed{A} \\boxed{B}", 0.0),
        # no claim
        ("I think B", 0.0),
        ("the answer is b", 0.0),  # lower case is not a letter choice
        ("Answer: Because", 0.0),
        ("The answer is E", 0.0),  # outside the choices
        ("", 0.0),
    ],
)
def test_multiple_choice(response, expected):
    assert multiple_choice("q", response, "B") == expected


def test_multiple_choice_unparseable_and_wrong_are_distinct():
    scores = {"correct": 1.0, "wrong": -1.0, "unparseable": -2.0}
    assert multiple_choice("q", "Answer: C", "B", **scores) == -1.0
    assert multiple_choice("q", "Answer: A, B", "B", **scores) == -2.0
    assert multiple_choice("q", "no idea", "B", **scores) == -2.0
    assert multiple_choice("q", "Answer: E", "E", choices="ABCDE", **scores) == 1.0


@pytest.mark.parametrize(
    ("label", "expected"),
    [("B", 1.0), (" b ", 1.0), ("(B)", 1.0), ("C", 0.0), (None, None), ("E", None), ("AB", None)],
)
def test_multiple_choice_labels(label, expected):
    assert multiple_choice("q", "Answer: B", label) == expected


@pytest.mark.parametrize("choices", ["", "abcd", "AAB", "A B"])
def test_multiple_choice_bad_choices(choices):
    with pytest.raises(ValueError, match="choices must be distinct upper-case letters"):
        multiple_choice("q", "B", None, choices=choices)


def test_multiple_choice_long_whitespace_is_quick():
    start = time.perf_counter()
    assert multiple_choice("q", "answer is" + " " * 10**6 + "x", "A") == 0.0
    assert time.perf_counter() - start < 1.0


# ------------------------------------------------------------------------------------------
# regex_match / length_in_range
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "pattern", "full", "expected"),
    [
        ("<think>x</think> 5", r"<think>.*</think>", False, 1.0),
        ("no tags", r"<think>.*</think>", False, 0.0),
        ("<think>x</think> 5", r"<think>.*</think>", True, 0.0),
        ("<think>x</think>", r"<think>.*</think>", True, 1.0),
        ("x" * 100_001 + "END", "END", False, 0.0),  # past the 100k search cap
        ("x" * 99_997 + "END", "END", False, 1.0),  # just inside it
        ("x" * 100_001, "x*", True, 0.0),  # too long to check whole
    ],
)
def test_regex_match(response, pattern, full, expected):
    assert regex_match("q", response, None, pattern=pattern, full=full) == expected


def test_regex_match_scores_and_cache():
    assert regex_match("q", "abc", "ignored", pattern="b", match=0.5, miss=-0.5) == 0.5
    assert regex_match("q", "xyz", None, pattern="b", match=0.5, miss=-0.5) == -0.5
    assert compile_pattern("b") is compile_pattern("b")  # compiled once


def test_regex_match_bad_pattern_names_it():
    with pytest.raises(ValueError, match=r"bad regex pattern '\(unclosed'"):
        regex_match("q", "text", None, pattern="(unclosed")


@pytest.mark.parametrize(
    ("response", "expected"),
    [("", 0.0), ("abc", 1.0), ("abcde", 1.0), ("abcdef", 0.0), ("ab", 0.0), ("  a  ", 1.0)],
)
def test_length_in_range(response, expected):
    assert length_in_range("q", response, None, min_chars=3, max_chars=5) == expected


@pytest.mark.parametrize(("min_chars", "max_chars"), [(-1, 5), (6, 5)])
def test_length_in_range_bad_bounds(min_chars, max_chars):
    with pytest.raises(ValueError, match="need 0 <= min_chars <= max_chars"):
        length_in_range("q", "abc", None, min_chars=min_chars, max_chars=max_chars)


# ------------------------------------------------------------------------------------------
# resolve(name, params)
# ------------------------------------------------------------------------------------------


def test_resolve_binds_params():
    fn = resolve("math_answer", {"wrong": 0.0, "style": "hash"})
    assert isinstance(fn, functools.partial)
    assert fn("q", "#### 3", "4") == 0.0  # wrong now scores 0, not 0.1
    assert fn("q", "#### 4", "4") == 1.0
    assert fn("q", "\\boxed{4}", "4") == 0.0  # style "hash" ignores boxes

    regex = resolve("regex_match", {"pattern": r"^\d+$", "full": True})
    assert regex("q", "123", None) == 1.0
    assert regex("q", "12a", None) == 0.0

    length = resolve("length_in_range", {"max_chars": 2})
    assert (length("q", "ab", None), length("q", "abc", None)) == (1.0, 0.0)

    assert resolve("math_answer") is math_answer
    assert resolve("math_answer", {}) is math_answer


def test_resolve_import_path_with_params():
    fn = resolve("reward_service.verifiers:multiple_choice", {"choices": "AB"})
    assert fn("q", "Answer: B", "B") == 1.0


def test_resolve_unknown_param_lists_accepted():
    with pytest.raises(ValueError) as e:
        resolve("math_answer", {"correct": 1.0, "tolerance": 0.01})
    assert str(e.value) == (
        "reward function 'math_answer' got unknown params ['tolerance']; "
        "it accepts: correct, wrong, unparseable, style"
    )


def test_resolve_params_for_a_function_without_any():
    with pytest.raises(ValueError, match="got unknown params \\['x'\\]; it accepts: none"):
        resolve("exact_integer", {"x": 1})


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("regex_match", None, r"reward function 'regex_match' needs the params \['pattern'\]"),
        ("regex_match", {"full": True}, r"needs the params \['pattern'\]"),
        ("length_in_range", {"min_chars": 1}, r"needs the params \['max_chars'\]"),
    ],
)
def test_resolve_missing_required_param(name, params, message):
    with pytest.raises(ValueError, match=message):
        resolve(name, params)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("regex_match", {"pattern": "[a-"}, r"'regex_match': bad regex pattern '\[a-'"),
        ("math_answer", {"style": "latex"}, "'math_answer': unknown answer style 'latex'"),
        ("multiple_choice", {"choices": "ab"}, "choices must be distinct upper-case letters"),
        ("length_in_range", {"max_chars": -1}, "need 0 <= min_chars <= max_chars"),
        ("code_tests", {"timeout_s": 0}, "timeout_s and memory_mib must be positive"),
    ],
)
def test_resolve_checks_param_values_up_front(name, params, message):
    with pytest.raises(ValueError, match=message):
        resolve(name, params)
