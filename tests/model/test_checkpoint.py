"""Checkpoint layouts (single file, sharded, per-expert, fused) and bad checkpoints."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shared.model.checkpoint import load_config, load_expert, load_experts
from shared.model.errors import CheckpointError, ConfigError, ModelError, UnsupportedModelError
from shared.model.model import Batch, MoEModel
from shared.model.moe import LocalExperts

PROMPT = [5, 17, 99, 3, 250, 41, 8, 77, 120, 64, 9, 31, 200, 11, 6, 150]


def _logits(path: Path) -> torch.Tensor:
    model, experts = MoEModel.from_checkpoint(path), LocalExperts.from_checkpoint(path)
    cache = model.new_cache(1, 32)
    slot = cache.allocate()
    first = model.forward(Batch([slot], [PROMPT]), cache, experts, all_logits=True)
    second = model.forward(Batch([slot], [[int(first[-1].argmax())]]), cache, experts)
    return torch.cat([first, second])


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_sharded_and_fused_layouts_give_identical_logits(family: str, tiny_dir: Callable[..., Path]) -> None:
    reference = _logits(tiny_dir(family))
    for options in ({"fused": True}, {"max_shard_size": "40KB"}, {"fused": True, "max_shard_size": "40KB"}):
        path = tiny_dir(family, **options)
        if "max_shard_size" in options:
            assert (path / "model.safetensors.index.json").is_file()
            assert len(list(path.glob("*.safetensors"))) > 2
        assert torch.equal(_logits(path), reference), options


def test_fused_expert_slices_equal_per_expert_tensors(tiny_dir: Callable[..., Path]) -> None:
    per_expert, fused = tiny_dir("olmoe"), tiny_dir("olmoe", fused=True)
    names = {k for k in load_file(fused / "model.safetensors") if "experts" in k}
    assert any(k.endswith("experts.gate_up_proj") for k in names)
    for layer, expert in [(0, 0), (1, 7), (0, 3)]:
        a, b = load_expert(per_expert, layer, expert), load_expert(fused, layer, expert)
        for x, y in zip((a.gate, a.up, a.down), (b.gate, b.up, b.down), strict=True):
            assert torch.equal(x, y)
        assert a.gate.shape == (48, 64)
        assert a.down.shape == (64, 48)
        assert a.nbytes() == 3 * 48 * 64 * 4


def test_load_expert_reads_only_its_shard(tiny_dir: Callable[..., Path], tmp_path: Path) -> None:
    src = tiny_dir("mixtral", max_shard_size="40KB")
    path = tmp_path / "partial"
    shutil.copytree(src, path)
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    wanted = weight_map["model.layers.0.block_sparse_moe.experts.0.w1.weight"]
    needed = {weight_map[f"model.layers.0.block_sparse_moe.experts.0.{w}.weight"] for w in ("w1", "w2", "w3")}
    victim = next(f for f in sorted(set(weight_map.values())) if f not in needed)
    (path / victim).unlink()
    expert = load_expert(path, 0, 0)
    assert torch.equal(expert.gate, load_expert(src, 0, 0).gate)
    lost = next(k for k, f in weight_map.items() if f == victim)
    with pytest.raises(CheckpointError, match=victim):
        MoEModel.from_checkpoint(path) if "experts" not in lost else load_experts(path)
    assert wanted in weight_map.values()


def test_dense_model_loads_without_routed_experts(tiny_dir: Callable[..., Path], tmp_path: Path) -> None:
    src = tiny_dir("qwen3_moe", fused=True)
    path = tmp_path / "dense-only"
    shutil.copytree(src, path)
    tensors = load_file(path / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".experts." not in k}, path / "model.safetensors")
    model = MoEModel.from_checkpoint(path)  # must not touch the experts
    assert model.config.num_experts == 8
    with pytest.raises(CheckpointError, match=r"expert \(1, 2\)"):
        load_expert(path, 1, 2)


def _edit(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def _config_edit(src: Path, dst: Path, **changes: object) -> Path:
    shutil.copytree(src, dst)
    data = json.loads((dst / "config.json").read_text())
    data.update(changes)
    (dst / "config.json").write_text(json.dumps(data))
    return dst


def test_missing_directory_and_files(tmp_path: Path, tiny_dir: Callable[..., Path]) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        MoEModel.from_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_config(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_config(tmp_path / "empty")
    path = tmp_path / "no-weights"
    shutil.copytree(tiny_dir("mixtral"), path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        MoEModel.from_checkpoint(path)


def test_unsupported_architecture_and_options(tmp_path: Path, tiny_dir: Callable[..., Path]) -> None:
    src = tiny_dir("mixtral")
    with pytest.raises(UnsupportedModelError, match=r"'llama'.*supported: .*mixtral, olmoe, qwen2_moe, qwen3_moe"):
        load_config(_config_edit(src, tmp_path / "a", model_type="llama", architectures=["LlamaForCausalLM"]))
    with pytest.raises(UnsupportedModelError, match="rope type 'longrope'"):
        load_config(_config_edit(src, tmp_path / "b", rope_parameters={"rope_type": "longrope", "rope_theta": 1.0}))
    with pytest.raises(UnsupportedModelError, match="hidden_act 'gelu'"):
        load_config(_config_edit(src, tmp_path / "c", hidden_act="gelu"))
    bad = _config_edit(src, tmp_path / "d")
    data = json.loads((bad / "config.json").read_text())
    del data["num_local_experts"]
    (bad / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="num_experts"):
        load_config(bad)
    with pytest.raises(ConfigError, match="num_heads"):
        load_config(_config_edit(src, tmp_path / "e", num_key_value_heads=3))


def test_missing_and_misshapen_tensors(tmp_path: Path, tiny_dir: Callable[..., Path]) -> None:
    src = tiny_dir("mixtral")
    name = "model.layers.1.self_attn.k_proj.weight"
    missing = _edit(src, tmp_path / "missing", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"no tensor '{name}'"):
        MoEModel.from_checkpoint(missing)

    def reshape(t: dict[str, torch.Tensor]) -> None:
        t[name] = torch.zeros(16, 32)

    wrong = _edit(src, tmp_path / "wrong", reshape)
    with pytest.raises(CheckpointError, match=r"has shape \(16, 32\), expected \(32, 64\)"):
        MoEModel.from_checkpoint(wrong)
    expert = "model.layers.0.block_sparse_moe.experts.3.w2.weight"
    no_expert = _edit(src, tmp_path / "no-expert", lambda t: t.pop(expert))
    with pytest.raises(CheckpointError, match=f"no tensor '{expert}'"):
        LocalExperts.from_checkpoint(no_expert)
    with pytest.raises(CheckpointError, match=r"no routed expert \(0, 8\)"):
        load_expert(src, 0, 8)


def test_errors_are_value_errors() -> None:
    for cls in (CheckpointError, ConfigError, UnsupportedModelError):
        assert issubclass(cls, ModelError)
        assert issubclass(cls, ValueError)


def test_hf_config_fields_are_translated(tiny_dir: Callable[..., Path]) -> None:
    q2 = load_config(tiny_dir("qwen2_moe"))
    assert q2.moe_layers == (0, 2)
    assert q2.intermediate_size == 128
    assert q2.shared_expert_intermediate_size == 96
    assert q2.qkv_bias
    assert not q2.norm_topk_prob
    q3 = load_config(tiny_dir("qwen3_moe"))
    assert q3.head_dim == 32
    assert q3.qk_norm == "per_head"
    assert q3.norm_topk_prob
    ol = load_config(tiny_dir("olmoe"))
    assert ol.qk_norm == "full"
    assert ol.num_kv_heads == 2
    mx = load_config(tiny_dir("mixtral"))
    assert mx.router_weights_fp32
    assert mx.rope.theta == 1e6
    assert mx.eos_token_id == 2
