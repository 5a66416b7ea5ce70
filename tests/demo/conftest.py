"""Fixtures for the demo-model tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo"


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    # 2 shared cores: two intra-op threads spin against each other under load (100x slower).
    torch.set_num_threads(1)
