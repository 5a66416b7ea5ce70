"""Reading Hugging Face checkpoint directories: config.json and (sharded) safetensors.

Tensors are read lazily with `safe_open`, one tensor (or one expert's slice of a fused tensor) at
a time, so loading one expert never reads the others. Both expert layouts are understood:
per-expert names (`...experts.{e}.w1.weight` or `...experts.{e}.gate_proj.weight`) and transformers'
fused `experts.gate_up_proj [E, 2I, D]` / `experts.down_proj [E, D, I]` (gate is `[e, :I]`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from shared.model.config import ModelConfig, list_moe_layers
from shared.model.errors import CheckpointError
from shared.model.families import family_of, parse_hf_config
from shared.model.moe import ExpertWeights, aligned

__all__ = ["TensorReader", "list_moe_layers", "load_config", "load_expert", "load_experts"]

INDEX_FILE = "model.safetensors.index.json"


def load_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of checkpoint directory `path` (from its config.json)."""
    file = _directory(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"no config.json in {file.parent}")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {file}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} does not hold a JSON object")
    return parse_hf_config(data)


def _directory(path: str | Path) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    return directory


def _weight_map(directory: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index if there is one, else from the files."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            names = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"cannot read the weight_map of {index}: {exc}") from exc
        # Shards are opened lazily: a host may hold only the shards of the experts it serves.
        return {name: directory / file for name, file in names.items()}
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"no *.safetensors files (and no {INDEX_FILE}) in {directory}")
    files = {}
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                files.update(dict.fromkeys(f.keys(), shard))
        except Exception as exc:  # safetensors raises SafetensorError (a bare Exception subclass)
            raise CheckpointError(f"cannot read {shard}: {exc}") from exc
    return files


class TensorReader:
    """Reads named tensors of one checkpoint; a context manager that keeps its files open."""

    def __init__(self, path: str | Path, dtype: torch.dtype, device: torch.device | str) -> None:
        self.directory = _directory(path)
        self.dtype = dtype
        self.device = torch.device(device)
        self.files = _weight_map(self.directory)
        self._stack = ExitStack()
        self._open: dict[Path, Any] = {}

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stack.close()
        self._open.clear()

    def has(self, name: str) -> bool:
        return name in self.files

    def _handle(self, name: str) -> Any:
        file = self.files.get(name)
        if file is None:
            raise CheckpointError(f"checkpoint {self.directory} has no tensor {name!r}")
        if file not in self._open:
            if not file.is_file():
                raise CheckpointError(f"tensor {name!r} is in {file.name}, which is missing from {self.directory}")
            try:
                self._open[file] = self._stack.enter_context(safe_open(str(file), framework="pt"))
            except Exception as exc:  # SafetensorError
                raise CheckpointError(f"cannot read {file}: {exc}") from exc
        return self._open[file]

    def get(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """Tensor `name`, checked to have `shape`, in the reader's dtype and device."""
        handle = self._handle(name)
        try:
            tensor = handle.get_tensor(name)
        except Exception as exc:  # SafetensorError on a truncated file
            raise CheckpointError(f"cannot read tensor {name!r} from {self.files[name]}: {exc}") from exc
        return self._finish(name, tensor, shape)

    def get_rows(self, name: str, index: int, shape: tuple[int, ...]) -> Tensor:
        """Slice `name[index]` (one expert of a fused tensor) without reading the rest."""
        handle = self._handle(name)
        full = tuple(handle.get_slice(name).get_shape())
        if len(full) != len(shape) + 1 or full[1:] != shape or not 0 <= index < full[0]:
            raise CheckpointError(
                f"tensor {name!r} has shape {full}; expected [E, {', '.join(map(str, shape))}] "
                f"with expert {index} < E"
            )
        return self._finish(name, handle.get_slice(name)[index], shape)

    def _finish(self, name: str, tensor: Tensor, shape: tuple[int, ...]) -> Tensor:
        if tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape} from config.json"
            )
        # aligned(): an own, 64-byte aligned copy, so results do not depend on the file layout.
        return aligned(tensor.to(device=self.device, dtype=self.dtype))

    def first(self, names: Iterable[str]) -> str | None:
        """The first of `names` present in the checkpoint."""
        return next((n for n in names if n in self.files), None)


def _expert_from(reader: TensorReader, config: ModelConfig, layer: int, expert: int) -> ExpertWeights:
    family = family_of(config)
    D, inner = config.hidden_size, config.moe_intermediate_size  # D, I of the shape legend
    if not 0 <= expert < config.num_experts or layer not in config.moe_layers:
        raise CheckpointError(
            f"no routed expert ({layer}, {expert}): MoE layers are {list(config.moe_layers)}, "
            f"experts 0..{config.num_experts - 1}"
        )
    gate_name, up_name, down_name = family.expert_names
    for moe in family.moe_prefixes:
        base = f"model.layers.{layer}.{moe}.experts"
        if reader.has(f"{base}.{expert}.{gate_name}.weight"):
            return ExpertWeights(
                gate=reader.get(f"{base}.{expert}.{gate_name}.weight", (inner, D)),
                up=reader.get(f"{base}.{expert}.{up_name}.weight", (inner, D)),
                down=reader.get(f"{base}.{expert}.{down_name}.weight", (D, inner)),
            )
        if reader.has(f"{base}.gate_up_proj"):
            return ExpertWeights.from_gate_up(
                reader.get_rows(f"{base}.gate_up_proj", expert, (2 * inner, D)),
                reader.get_rows(f"{base}.down_proj", expert, (D, inner)),
            )
    tried = ", ".join(f"model.layers.{layer}.{m}.experts.{{{expert}.{gate_name}.weight|gate_up_proj}}"
                      for m in family.moe_prefixes)
    raise CheckpointError(f"checkpoint {reader.directory} has no weights for expert ({layer}, {expert}); tried {tried}")


def load_expert(
    path: str | Path, layer: int, expert: int, dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> ExpertWeights:
    """One routed expert (gate [I, D], up [I, D], down [D, I]); reads only its own bytes."""
    config = load_config(path)
    with TensorReader(path, dtype, device) as reader:
        return _expert_from(reader, config, layer, expert)


def all_expert_keys(config: ModelConfig) -> Iterator[tuple[int, int]]:
    """Every (layer, expert) of the model, layer-major."""
    for layer in list_moe_layers(config):
        for expert in range(config.num_experts):
            yield layer, expert


def load_experts(
    path: str | Path, keys: Iterable[tuple[int, int]] | None = None, dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> dict[tuple[int, int], ExpertWeights]:
    """The routed experts `keys` ((layer, expert) pairs; None = all), files opened once."""
    config = load_config(path)
    with TensorReader(path, dtype, device) as reader:
        wanted = all_expert_keys(config) if keys is None else keys
        return {(layer, expert): _expert_from(reader, config, layer, expert) for layer, expert in wanted}
