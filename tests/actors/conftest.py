"""The model-family matrix (``orchestration.tiny_model.FAMILY_MATRIX``), built once for the
actor tests."""

from __future__ import annotations

import pytest

from orchestration.data import addition_corpus
from orchestration.tiny_model import FAMILY_MATRIX, build_tiny_model


@pytest.fixture(scope="session")
def family_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("families")
    return {
        name: build_tiny_model(str(root / name), addition_corpus(4), spec)
        for name, spec in FAMILY_MATRIX.items()
    }
