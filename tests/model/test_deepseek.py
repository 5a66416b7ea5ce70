"""DeepSeek-V2 / V3 against transformers (the oracle): MLA in both of its forms, routing, layouts, cache size.

Logits agree to 1e-4 (fp32) over a 20-token prefill and 8 cached decode steps at batch 1, and over a
ragged batch of 3 (one sequence joins with its prefill while two decode), with MLA forced to its
absorbed and to its expanded form; greedy generation gives transformers' 16 tokens; the fused expert
layout gives the same logits; the cache holds kv_lora_rank + qk_rope_head_dim values per token and layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from shared.model.cache import KVCache
from shared.model.config import preset
from shared.model.deepseek import DeepSeekRouter
from shared.model.errors import ConfigError, UnsupportedModelError
from shared.model.families import parse_hf_config
from shared.model.mla import MLAttention, Mode
from shared.model.model import Batch, MoEModel
from shared.model.moe import LocalExperts
from shared.model.step import build_context
from tests.checkpoints import tiny_config
from tests.model.test_parity import check_greedy, hf_chunk_logits

TOL = 1e-4
DEEPSEEK = ("deepseek_v2", "deepseek_v3")
MODES: tuple[Mode, ...] = ("absorbed", "expanded")


def _prompt(n: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def _load(path: Path, mode: Mode = "auto") -> tuple[MoEModel, LocalExperts]:
    """The model with every layer's MLA forced to `mode`, and all its routed experts."""
    model = MoEModel.from_checkpoint(path)
    layers = []
    for layer in model.layers:
        assert isinstance(layer.attention, MLAttention)
        layers.append(dataclasses.replace(layer, attention=dataclasses.replace(layer.attention, mode=mode)))
    model.layers = layers
    return model, LocalExperts.from_checkpoint(path)


def batch1_error(model: MoEModel, experts: LocalExperts, hf: Any, prompt_len: int = 20, steps: int = 8) -> float:
    """Max |ours - transformers| over a prefill and `steps` cached greedy decode steps."""
    prompt = _prompt(prompt_len, 1, model.config.vocab_size)
    cache = model.new_cache(1, prompt_len + steps)
    slot = cache.allocate()
    chunks, got = [prompt], [model.forward(Batch([slot], [prompt]), cache, experts, all_logits=True)]
    for _ in range(steps):
        chunks.append([int(got[-1][-1].argmax())])
        got.append(model.forward(Batch([slot], [chunks[-1]]), cache, experts))
    ours, ref = torch.cat(got), hf_chunk_logits(hf, chunks)
    assert ours.shape == ref.shape == (prompt_len + steps, model.config.vocab_size)
    return float((ours - ref).abs().max())


def ragged_error(model: MoEModel, experts: LocalExperts, hf: Any, steps: int = 8) -> float:
    """Three sequences in one cache; the third joins with its prefill while the others decode."""
    V = model.config.vocab_size
    prompts = [_prompt(17, 2, V), _prompt(5, 3, V), _prompt(11, 4, V)]
    cache = model.new_cache(3, 17 + steps + 1)
    slots = [cache.allocate() for _ in prompts]
    chunks: list[list[list[int]]] = [[prompts[0]], [prompts[1]], []]
    logits = model.forward(Batch(slots[:2], prompts[:2]), cache, experts, all_logits=True)
    got: list[list[torch.Tensor]] = [list(logits[:17]), list(logits[17:]), []]
    for step in range(steps):
        toks = [[int(got[0][-1].argmax())], [int(got[1][-1].argmax())]]
        toks.append(prompts[2] if step == 0 else [int(got[2][-1].argmax())])
        logits = model.forward(Batch(slots, toks), cache, experts, all_logits=True)
        offset = 0
        for i, t in enumerate(toks):
            chunks[i].append(t)
            got[i] += list(logits[offset : offset + len(t)])
            offset += len(t)
    return max(float((torch.stack(got[i]) - hf_chunk_logits(hf, chunks[i])).abs().max()) for i in range(3))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", DEEPSEEK)
def test_parity_batch1_and_ragged(family: str, mode: Mode, tiny_dir: Callable[..., Path], hf_model: Any) -> None:
    path = tiny_dir(family)
    model, experts = _load(path, mode)
    hf = hf_model(path)
    assert batch1_error(model, experts, hf) <= TOL
    assert ragged_error(model, experts, hf) <= TOL


@pytest.mark.parametrize("family", DEEPSEEK)
def test_auto_mode_takes_both_forms(family: str, tiny_dir: Callable[..., Path]) -> None:
    """Decode reads the latent directly; a long prefill decompresses (the cheaper form per step)."""
    model = MoEModel.from_checkpoint(tiny_dir(family))
    attention = model.layers[0].attention
    assert isinstance(attention, MLAttention)
    cache = model.new_cache(2, 200)
    decode, prefill = cache.allocate(), cache.allocate()
    ctx = build_context([decode], [[5] * 150], cache, model.config.vocab_size, model.device)
    assert not attention.absorbs(ctx)
    cache.advance(decode, 150)
    ctx = build_context([decode, prefill], [[5], [6]], cache, model.config.vocab_size, model.device)
    assert attention.absorbs(ctx)


@pytest.mark.parametrize("family", DEEPSEEK)
def test_greedy_matches_transformers_generate(family: str, tiny_dir: Callable[..., Path], hf_model: Any) -> None:
    path = tiny_dir(family)
    check_greedy(path, hf_model(path), n=16)


@pytest.mark.parametrize("family", DEEPSEEK)
def test_fused_layout_gives_the_same_logits(family: str, tiny_dir: Callable[..., Path]) -> None:
    per_expert, fused = tiny_dir(family), tiny_dir(family, fused=True)
    with safe_open(str(fused / "model.safetensors"), framework="pt") as f:
        assert "model.layers.1.mlp.experts.gate_up_proj" in set(f.keys())
    prompt = _prompt(16, 7, 320)
    outs = []
    for path in (per_expert, fused):
        model, experts = _load(path)
        cache = model.new_cache(1, 16)
        outs.append(model.forward(Batch([cache.allocate()], [prompt]), cache, experts, all_logits=True))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("family", DEEPSEEK)
def test_cache_holds_latent_and_rotary_key_only(family: str, tiny_dir: Callable[..., Path]) -> None:
    model = MoEModel.from_checkpoint(tiny_dir(family))
    mla = model.config.mla
    assert mla is not None
    cache = model.new_cache(3, 32)
    width = mla.kv_lora_rank + mla.qk_rope_head_dim  # 32 + 8, not 2 * heads * head dims (4 * (24 + 16))
    assert cache.nbytes_per_token() == model.config.num_layers * width * 4
    total = sum(t.untyped_storage().nbytes() for t in cache.keys)
    assert total == cache.nbytes_per_token() * 3 * 32
    for keys, values in zip(cache.keys, cache.values, strict=True):
        assert values.untyped_storage().data_ptr() == keys.untyped_storage().data_ptr()  # a view, no bytes


def test_v2_lite_cache_is_576_values_per_token_and_layer() -> None:
    config = preset("deepseek-v2-lite")
    cache = KVCache(config, max_slots=1, max_len=4, dtype=torch.bfloat16)
    assert cache.nbytes_per_token() == 27 * (512 + 64) * 2  # 31,104 bytes per token


def test_v2_lite_tiny_preset_has_the_real_structure() -> None:
    tiny, real = preset("deepseek-v2-lite-tiny"), preset("deepseek-v2-lite")
    for c in (tiny, real):
        assert (c.num_layers, c.moe_layers) == (27, tuple(range(1, 27)))
        assert (c.num_experts, c.top_k) == (64, 6)
        assert c.shared_expert_intermediate_size == 2 * c.moe_intermediate_size
        assert c.mla is not None
        assert c.mla.q_lora_rank is None
        assert c.routing is not None
        assert c.routing.topk_method == "greedy"
    assert real.expert_nbytes() == 3 * 2048 * 1408 * 2  # 17.3 MB per routed expert in bf16


# The published DeepSeek-V2-Lite config.json (original spelling: rope_scaling, no head_dim).
V2_LITE_JSON: dict[str, Any] = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "bos_token_id": 100000,
    "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "model_type": "deepseek_v2", "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1,
    "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16,
    "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "tie_word_embeddings": False,
    "topk_group": 1, "topk_method": "greedy", "v_head_dim": 128, "vocab_size": 102400,
}


def test_published_v2_lite_config_parses_to_the_preset() -> None:
    assert parse_hf_config(V2_LITE_JSON) == preset("deepseek-v2-lite")


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"num_key_value_heads": 8}, ConfigError),
        ({"topk_method": "noaux_tc"}, UnsupportedModelError),
        ({"scoring_func": "sigmoid"}, UnsupportedModelError),
        ({"quantization_config": {"quant_method": "fp8"}}, UnsupportedModelError),
        ({"topk_method": "group_limited_greedy", "n_group": 3, "topk_group": 1}, ConfigError),
        ({"topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 0}, ConfigError),
    ],
)
def test_bad_deepseek_configs_are_refused(changes: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_hf_config({**V2_LITE_JSON, **changes})


# Each variant changes a code path: q-LoRA with biases and greedy routing; no dense layer, one shared
# expert, yarn whose attention factor is not 1; V3 with half-split RoPE, no renormalisation and yarn;
# V3 with a single kept group of four.
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("deepseek_v2", {"topk_method": "greedy", "q_lora_rank": 24, "attention_bias": True,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    ("deepseek_v2", {"first_k_dense_replace": 0, "n_shared_experts": 1, "num_experts_per_tok": 2,
                     "rope_parameters": {"rope_type": "yarn", "factor": 8.0, "rope_theta": 10000.0,
                                         "original_max_position_embeddings": 32, "mscale": 1.0,
                                         "mscale_all_dim": 0.5}}),
    ("deepseek_v3", {"rope_interleave": False, "norm_topk_prob": False,
                     "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                         "original_max_position_embeddings": 64, "mscale": 1.0,
                                         "mscale_all_dim": 1.0}}),
    ("deepseek_v3", {"n_group": 2, "topk_group": 1, "num_experts_per_tok": 4, "first_k_dense_replace": 2,
                     "q_lora_rank": None}),
]


@pytest.mark.parametrize(("family", "options"), VARIANTS, ids=lambda v: str(v)[:48])
def test_config_variants(family: str, options: dict[str, Any], tiny_dir: Callable[..., Path], hf_model: Any) -> None:
    path = tiny_dir(family, **options)
    hf = hf_model(path)
    for mode in MODES:
        model, experts = _load(path, mode)
        assert batch1_error(model, experts, hf, steps=4) <= TOL
    assert ragged_error(*_load(path), hf, steps=3) <= TOL


def _hf_router(family: str, **options: Any) -> tuple[Any, DeepSeekRouter]:
    """transformers' router module with random weights, and ours built from the same tensors."""
    import transformers

    config = tiny_config(family, **options)
    models = transformers.models
    module: Any
    if family == "deepseek_v2":
        module = models.deepseek_v2.modeling_deepseek_v2.DeepseekV2TopkRouter(config)
    else:
        module = models.deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        module.weight.copy_(torch.randn(module.weight.shape, generator=g) * 0.3)
        bias = getattr(module, "e_score_correction_bias", None)
        if bias is not None:
            bias.copy_(torch.randn(bias.shape, generator=g) * 0.2)
    parsed = parse_hf_config(config.to_dict())
    assert parsed.routing is not None
    ours = DeepSeekRouter(module.weight.detach().clone(), None if bias is None else bias.clone(),
                          parsed.top_k, parsed.routing, parsed.norm_topk_prob)
    return module, ours


ROUTINGS: list[tuple[str, dict[str, Any]]] = [
    ("deepseek_v2", {"topk_method": "greedy", "routed_scaling_factor": 16.0}),
    ("deepseek_v2", {}),  # group_limited_greedy, 4 groups, keep 2
    ("deepseek_v3", {}),  # noaux_tc with the correction bias
    ("deepseek_v3", {"n_routed_experts": 16, "n_group": 4, "topk_group": 1, "num_experts_per_tok": 4}),
]


@pytest.mark.parametrize(("family", "options"), ROUTINGS, ids=lambda v: str(v)[:40])
def test_router_matches_transformers(family: str, options: dict[str, Any]) -> None:
    module, ours = _hf_router(family, **options)
    h = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, ref_weights, ref_ids = module(h)
    ids, weights = ours(h)
    ref_order, order = ref_ids.argsort(dim=-1), ids.argsort(dim=-1)
    assert torch.equal(ids.gather(1, order), ref_ids.gather(1, ref_order))
    assert torch.allclose(weights.gather(1, order), ref_weights.gather(1, ref_order), atol=1e-6, rtol=0)
    assert weights.dtype == torch.float32


def test_correction_bias_steers_selection_not_weights() -> None:
    _, ours = _hf_router("deepseek_v3")
    assert ours.bias is not None
    h = torch.randn(256, 64, generator=torch.Generator().manual_seed(2))
    ids, weights = ours(h)
    unbiased_ids, _ = dataclasses.replace(ours, bias=torch.zeros_like(ours.bias))(h)
    assert not torch.equal(ids.sort().values, unbiased_ids.sort().values), "the bias must change some choices"
    scores = torch.sigmoid(h @ ours.weight.T).gather(1, ids)
    expected = scores / scores.sum(-1, keepdim=True) * ours.routing.routed_scaling_factor
    assert torch.allclose(weights, expected, atol=1e-6)
    groups = ids // (ours.weight.shape[0] // ours.routing.n_group)
    assert all(len(set(row)) <= ours.routing.topk_group for row in groups.tolist())


def test_bf16_model_keeps_routing_in_fp32(tiny_dir: Callable[..., Path]) -> None:
    path = tiny_dir("deepseek_v3")
    model = MoEModel.from_checkpoint(path, dtype=torch.bfloat16)
    router = model.layers[1].router
    assert isinstance(router, DeepSeekRouter)
    assert router.weight.dtype == torch.float32
    assert router.bias is not None
    assert router.bias.dtype == torch.float32
    experts = LocalExperts.from_checkpoint(path, dtype=torch.bfloat16)
    cache = model.new_cache(1, 24)
    logits = model.forward(Batch([cache.allocate()], [_prompt(12, 3, 320)]), cache, experts)
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits).all()
    assert cache.nbytes_per_token() == 3 * 40 * 2
