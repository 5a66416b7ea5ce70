"""A real multi-node Prism in one event loop (tests/serving's LocalCluster) and a tiny Mixtral."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shared.nats_server import NatsServer
from tests.checkpoints import make_tiny_checkpoint
from tests.serving.conftest import LocalCluster


@pytest.fixture(scope="session")
def metrics_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Mixtral tiny: 2 MoE layers, 8 experts, top-2."""
    return make_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("metrics-mixtral"), seed=5)


@pytest.fixture
async def cluster(nats_hub: NatsServer, tmp_path: Path, unique: str) -> AsyncIterator[LocalCluster]:
    c = LocalCluster(nats_hub, tmp_path, unique)
    try:
        yield c
    finally:
        await c.close()
