"""A tiny checkpoint shared by the launcher tests (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.checkpoints import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2-MoE tiny: MoE layers 0 and 2 (layer 1 dense), 8 experts, a shared expert."""
    return make_tiny_checkpoint("qwen2_moe", tmp_path_factory.mktemp("model") / "tiny")
