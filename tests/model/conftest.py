"""Fixtures for model tests: tiny checkpoints per family (built once per session) and their
transformers reference models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.checkpoints import FAMILIES, make_tiny_checkpoint


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    # 2 shared cores: keep each test process to one intra-op thread.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """tiny_dir(family, **options) -> checkpoint dir, built once per distinct arguments."""
    built: dict[str, Path] = {}

    def make(family: str, **options: Any) -> Path:
        key = family + repr(sorted(options.items()))
        if key not in built:
            path = tmp_path_factory.mktemp(family)
            built[key] = make_tiny_checkpoint(family, path, **options)
        return built[key]

    return make


@pytest.fixture(scope="session")
def hf_model() -> Callable[[Path], Any]:
    """hf_model(dir) -> the transformers model of a checkpoint (fp32, eval), cached."""
    import transformers

    loaded: dict[Path, Any] = {}

    def load(path: Path) -> Any:
        if path not in loaded:
            auto: Any = transformers.AutoModelForCausalLM
            loaded[path] = auto.from_pretrained(path, dtype=torch.float32).eval()
        return loaded[path]

    return load


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)
