"""``python -m orchestration.task_eval``: the built-in task's metric for a policy directory, and a
clear refusal of a path that is not one."""

import json

import pytest

from orchestration.task_eval import main

pytestmark = pytest.mark.unit  # pure code in this process


def test_a_policy_directory_is_scored_and_printed_as_a_json_line(tiny_model, capsys):
    assert main([tiny_model, "--samples", "2", "--max-operand", "1"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["model"] == tiny_model
    assert 0.0 <= result["right_fraction"] <= result["exact_integer"] <= 1.0


def test_a_path_that_is_not_a_policy_is_refused_with_exit_2(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")  # no weights
    for path in (tmp_path, tmp_path / "missing"):
        assert main([str(path)]) == 2
        assert "is not a policy directory" in capsys.readouterr().err
