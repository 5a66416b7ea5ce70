"""Session fixtures: a real nats-server hub (JetStream + MQTT listener) on ephemeral ports.

Tests isolate themselves with unique subjects, buckets and node names (see `unique`).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shared.nats_server import NatsServer, ServerConfig, free_port


@pytest.fixture(scope="session")
async def nats_hub(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[NatsServer]:
    workdir = tmp_path_factory.mktemp("nats-hub")
    cfg = ServerConfig(
        name="hub",
        port=free_port(),
        http_port=free_port(),
        store_dir=workdir / "js",
        domain="hub",
        mqtt_port=free_port(),
        leaf_port=free_port(),
        max_payload=4 * 1024 * 1024,
    )
    async with NatsServer(cfg, workdir) as server:
        yield server


@pytest.fixture
def unique() -> str:
    """A short name no other test uses: prefix subjects, buckets and node names with it."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
