import pytest

from reward_service.rules import REWARD_FUNCTIONS, exact_integer, resolve

pytestmark = pytest.mark.unit  # pure code in this process


@pytest.mark.parametrize(
    ("response", "label", "expected"),
    [
        ("7", "7", 1.0),  # right answer
        (" 7\n", "7", 1.0),  # whitespace does not matter
        ("-3", "-3", 1.0),
        ("8", "7", 0.1),  # a wrong integer still earns the format credit
        ("07", "7", 1.0),  # same integer
        ("7+", "7", 0.0),  # not an integer
        ("", "7", 0.0),
        ("seven", "7", 0.0),
        ("7", None, None),  # no label: cannot judge
        ("7", "x", None),  # a label that is not an integer cannot be judged either
    ],
)
def test_exact_integer(response, label, expected):
    assert exact_integer("3+4=", response, label) == expected


def test_resolve_builtin_and_import_path():
    assert resolve("exact_integer") is exact_integer
    assert resolve("reward_service.rules:exact_integer") is exact_integer
    assert "exact_integer" in REWARD_FUNCTIONS


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "nope",
            "unknown reward function 'nope'; use a built-in (code_tests, exact_integer, "
            "length_in_range, math_answer, multiple_choice, regex_match)",
        ),
        ("no_such_module_xyz:f", "cannot be imported"),
        ("reward_service.rules:missing", "cannot be imported"),
        ("reward_service.rules:REWARD_FUNCTIONS", "is not callable"),
    ],
)
def test_resolve_errors_name_the_problem(name, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(name)
