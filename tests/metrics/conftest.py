"""A real multi-node Prism in one event loop (tests/serving's LocalCluster and its fixture) and a tiny Mixtral."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.checkpoints import make_tiny_checkpoint
from tests.serving.conftest import cluster

__all__ = ["cluster"]


@pytest.fixture(scope="session")
def metrics_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Mixtral tiny: 2 MoE layers, 8 experts, top-2."""
    return make_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("metrics-mixtral"), seed=5)
