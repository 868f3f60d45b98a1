"""The math and the data contract import no distributed stack and no Raylign role."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.component  # fresh interpreters

HEAVY = ["ray", "deepspeed", "vllm"]
ROLES = ["actors", "orchestration", "reward_service", "learner"]


def imported_after(statement: str) -> set[str]:
    code = f"import sys, json\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return {m.split(".")[0] for m in json.loads(out.stdout)}


def test_algorithms_imports_torch_but_not_ray_deepspeed_or_vllm():
    mods = imported_after("import learner.algorithms")
    assert "torch" in mods
    assert mods.isdisjoint(HEAVY), mods & set(HEAVY)
    assert mods.isdisjoint(["pyarrow", "transformers"] + ROLES[:-1]), mods


def test_estimators_import_no_torch():
    # The config names an estimator and reads its setup choices without loading the math.
    mods = imported_after("import learner.estimators")
    assert mods.isdisjoint(["torch", "numpy", *HEAVY, *ROLES[:-1]]), mods


def test_rollout_imports_no_role_and_no_distributed_stack():
    mods = imported_after("import rollout")
    assert {"pyarrow", "torch"} <= mods
    assert mods.isdisjoint(HEAVY + ROLES), mods & set(HEAVY + ROLES)


def test_reward_service_imports_no_other_role_and_no_distributed_stack():
    # The layering: reward_service may import rollout, torch and transformers; Ray only where it
    # serves (reward_service.server), which this does not import.
    mods = imported_after(
        "import reward_service.scorer, reward_service.reward_model, reward_service.shaping, "
        "reward_service.verifiers, reward_service.code_verifier"
    )
    assert mods.isdisjoint(HEAVY + ["actors", "orchestration", "learner"]), mods
