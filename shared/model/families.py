"""Per-family knowledge of Hugging Face checkpoints: config.json fields and tensor names.

A family registers a `Family`: how to turn its `config.json` dict into a `ModelConfig`, and how
its tensors are named. Adding a family (e.g. DeepSeek-V2) means adding one parser and one entry
in `FAMILIES` here, plus its attention / router variants in `attention.py` / `router.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from shared.model.config import GroupRouting, MLAConfig, ModelConfig, RopeConfig
from shared.model.errors import ConfigError, UnsupportedModelError

Json = Mapping[str, Any]


@dataclass(frozen=True)
class Family:
    """How one family's config and tensors are spelled.

    moe_prefixes: names of the MoE block inside a layer, tried in order (Mixtral's original
    format says `block_sparse_moe`, transformers' in-memory/fused format says `mlp`).
    expert_names: per-expert (gate, up, down) module names.
    shared_expert: module name of the always-on expert(s) inside the MoE block.
    """

    parse: Callable[[Json], ModelConfig]
    moe_prefixes: tuple[str, ...]
    expert_names: tuple[str, str, str]
    shared_expert: str = "shared_expert"


def parse_hf_config(data: Json) -> ModelConfig:
    """Translate a Hugging Face config.json dict into a ModelConfig (raises ModelError subclasses)."""
    model_type = data.get("model_type")
    family = FAMILIES.get(str(model_type))
    if family is None:
        arch = ", ".join(data.get("architectures") or []) or "unknown"
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r} (architectures: {arch}); "
            f"supported: {', '.join(sorted(FAMILIES))}"
        )
    try:
        return family.parse(data)
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"config.json for {model_type} is missing or has a bad value for {exc}") from exc


def _common(data: Json, default_theta: float) -> dict[str, Any]:
    """Fields spelled the same way by every supported family."""
    act = data.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported; accepted: 'silu'")
    heads = int(data["num_attention_heads"])
    hidden = int(data["hidden_size"])
    eos = data.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    return {
        "vocab_size": int(data["vocab_size"]),
        "hidden_size": hidden,
        "num_layers": int(data["num_hidden_layers"]),
        "num_heads": heads,
        "num_kv_heads": int(data.get("num_key_value_heads") or heads),
        "head_dim": int(data.get("head_dim") or hidden // heads),
        "rms_norm_eps": float(data.get("rms_norm_eps", 1e-6)),
        "max_position_embeddings": int(data.get("max_position_embeddings", 4096)),
        "tie_word_embeddings": bool(data.get("tie_word_embeddings", False)),
        "rope": parse_rope(data, default_theta),
        "bos_token_id": data.get("bos_token_id"),
        "eos_token_ids": eos_ids,
        "pad_token_id": data.get("pad_token_id"),
    }


ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


def parse_rope(data: Json, default_theta: float) -> RopeConfig:
    """RoPE from `rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta` (older)."""
    params = dict(data.get("rope_parameters") or data.get("rope_scaling") or {})
    rope_type = str(params.get("rope_type", params.get("type", "default")))
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(f"rope type {rope_type!r} is not supported; accepted: {', '.join(ROPE_TYPES)}")
    partial = params.get("partial_rotary_factor", data.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise UnsupportedModelError(f"partial_rotary_factor {partial} is not supported; accepted: 1.0")
    theta = float(params.get("rope_theta") or data.get("rope_theta") or default_theta)
    max_pos = int(data.get("max_position_embeddings", 4096))
    original = params.get("original_max_position_embeddings") or data.get("original_max_position_embeddings")
    if rope_type in ("yarn", "llama3") and original is None:
        original = max_pos
    original = None if original is None else int(original)
    factor = params.get("factor")
    if factor is None:
        if rope_type == "yarn":
            factor = max_pos / (original or max_pos)
        elif rope_type != "default":
            raise ConfigError(f"rope type {rope_type!r} needs a 'factor'")
        else:
            factor = 1.0
    return RopeConfig(
        rope_type=rope_type,
        theta=theta,
        factor=float(factor),
        original_max_position_embeddings=original,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=_opt_float(params.get("attention_factor")),
        mscale=_opt_float(params.get("mscale")),
        mscale_all_dim=_opt_float(params.get("mscale_all_dim")),
        truncate=bool(params.get("truncate", True)),
    )


def _num_experts(data: Json) -> int:
    """Routed experts per layer; transformers 5 writes `num_local_experts` for every family."""
    value = data.get("num_experts", data.get("num_local_experts"))
    if value is None:
        raise KeyError("num_experts")
    return int(value)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _qwen_moe_layers(data: Json, num_layers: int) -> tuple[int, ...]:
    """Qwen's rule: layer i is sparse unless in mlp_only_layers, every decoder_sparse_step-th."""
    dense = set(data.get("mlp_only_layers") or [])
    step = int(data.get("decoder_sparse_step", 1) or 1)
    return tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)


def parse_mixtral(data: Json) -> ModelConfig:
    common = _common(data, default_theta=1e6)
    window = data.get("sliding_window")
    return ModelConfig(
        family="mixtral",
        num_experts=_num_experts(data),
        top_k=int(data["num_experts_per_tok"]),
        moe_intermediate_size=int(data["intermediate_size"]),
        moe_layers=tuple(range(common["num_layers"])),
        norm_topk_prob=True,
        router_weights_fp32=True,  # Mixtral's router keeps its fp32 softmax weights
        sliding_window=None if window is None else int(window),
        sliding_layers=() if window is None else tuple(range(common["num_layers"])),
        **common,
    )


def parse_qwen2_moe(data: Json) -> ModelConfig:
    common = _common(data, default_theta=10000.0)
    n = common["num_layers"]
    sliding: tuple[int, ...] = ()
    window = None
    if data.get("use_sliding_window"):
        window = int(data.get("sliding_window") or 4096)
        types = data.get("layer_types") or [
            "sliding_attention" if (i + 1) % 2 and i < int(data.get("max_window_layers", 28)) else "full"
            for i in range(n)
        ]
        sliding = tuple(i for i, kind in enumerate(types) if kind == "sliding_attention")
    return ModelConfig(
        family="qwen2_moe",
        num_experts=_num_experts(data),
        top_k=int(data["num_experts_per_tok"]),
        moe_intermediate_size=int(data["moe_intermediate_size"]),
        moe_layers=_qwen_moe_layers(data, n),
        intermediate_size=int(data["intermediate_size"]),
        shared_expert_intermediate_size=int(data["shared_expert_intermediate_size"]),
        shared_expert_gate=True,
        norm_topk_prob=bool(data.get("norm_topk_prob", False)),
        qkv_bias=bool(data.get("qkv_bias", True)),
        sliding_window=window if sliding else None,
        sliding_layers=sliding,
        **common,
    )


def parse_qwen3_moe(data: Json) -> ModelConfig:
    common = _common(data, default_theta=10000.0)
    n = common["num_layers"]
    window = int(data.get("sliding_window") or 4096) if data.get("use_sliding_window") else None
    bias = bool(data.get("attention_bias", False))
    return ModelConfig(
        family="qwen3_moe",
        num_experts=_num_experts(data),
        top_k=int(data["num_experts_per_tok"]),
        moe_intermediate_size=int(data["moe_intermediate_size"]),
        moe_layers=_qwen_moe_layers(data, n),
        intermediate_size=int(data["intermediate_size"]),
        norm_topk_prob=bool(data.get("norm_topk_prob", False)),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="per_head",
        sliding_window=window,
        sliding_layers=tuple(range(n)) if window else (),
        **common,
    )


def parse_olmoe(data: Json) -> ModelConfig:
    common = _common(data, default_theta=10000.0)
    # OLMoE's q/k norms span hidden_size, so it always uses head_dim = hidden / heads.
    common["head_dim"] = common["hidden_size"] // common["num_heads"]
    bias = bool(data.get("attention_bias", False))
    clip = data.get("clip_qkv")
    return ModelConfig(
        family="olmoe",
        num_experts=_num_experts(data),
        top_k=int(data["num_experts_per_tok"]),
        moe_intermediate_size=int(data["intermediate_size"]),
        moe_layers=tuple(range(common["num_layers"])),
        norm_topk_prob=bool(data.get("norm_topk_prob", False)),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="full",
        clip_qkv=None if clip is None else float(clip),
        **common,
    )


# transformers' defaults for fields a DeepSeek config.json may omit.
_DEEPSEEK_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v2": {"kv_lora_rank": 512, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                    "v_head_dim": 128, "n_shared_experts": 2, "first_k_dense_replace": 0, "n_group": None,
                    "topk_group": None, "topk_method": "greedy", "routed_scaling_factor": 1.0,
                    "scoring_func": "softmax"},
    "deepseek_v3": {"kv_lora_rank": 512, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                    "v_head_dim": 128, "n_shared_experts": 1, "first_k_dense_replace": 3, "n_group": 8,
                    "topk_group": 4, "topk_method": "noaux_tc", "routed_scaling_factor": 2.5,
                    "norm_topk_prob": True, "scoring_func": "sigmoid"},
}


def _deepseek_common(data: Json) -> dict[str, Any]:
    """MLA shapes, dense / MoE layers and shared experts, as DeepSeek-V2 and V3 spell them."""
    common = _common(data, default_theta=10000.0)
    heads = common["num_heads"]
    if common["num_kv_heads"] != heads:
        got = common["num_kv_heads"]
        raise ConfigError(f"MLA needs num_key_value_heads == num_attention_heads ({heads}), got {got}")
    if data.get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias is not supported; accepted: false")
    if data.get("quantization_config"):
        raise UnsupportedModelError("quantized (e.g. FP8) DeepSeek checkpoints are not supported; use bf16 weights")
    q_rank = data.get("q_lora_rank")
    mla = MLAConfig(
        kv_lora_rank=int(data["kv_lora_rank"]),
        qk_nope_head_dim=int(data["qk_nope_head_dim"]),
        qk_rope_head_dim=int(data["qk_rope_head_dim"]),
        v_head_dim=int(data["v_head_dim"]),
        q_lora_rank=None if q_rank is None else int(q_rank),
        rope_interleave=bool(data.get("rope_interleave", True)),
        attention_bias=bool(data.get("attention_bias", False)),
    )
    common["head_dim"] = mla.qk_rope_head_dim  # RoPE covers only the decoupled rotary part
    n, moe_width = common["num_layers"], int(data["moe_intermediate_size"])
    # Like transformers (which loads these checkpoints), every layer from first_k_dense_replace on is
    # MoE; DeepSeek's own `moe_layer_freq` is 1 in every published config and is not read.
    first_dense = int(data["first_k_dense_replace"] or 0)
    return {
        "num_experts": int(data["n_routed_experts"]),
        "top_k": int(data["num_experts_per_tok"]),
        "moe_intermediate_size": moe_width,
        "moe_layers": tuple(range(first_dense, n)),
        "intermediate_size": int(data["intermediate_size"]),
        "shared_expert_intermediate_size": moe_width * int(data["n_shared_experts"] or 0),
        "router_weights_fp32": True,  # DeepSeek keeps its gate and its routing weights in fp32
        "mla": mla,
        **common,
    }


def _deepseek_routing(data: Json, scoring: str, methods: tuple[str, ...]) -> GroupRouting:
    method = str(data["topk_method"])
    if method not in methods or data["scoring_func"] != scoring:
        raise UnsupportedModelError(
            f"{data['model_type']}: topk_method {method!r} / scoring_func {data['scoring_func']!r} not supported; "
            f"accepted: {', '.join(methods)} with {scoring}"
        )
    grouped = method != "greedy"
    return GroupRouting(
        scoring="softmax" if scoring == "softmax" else "sigmoid",
        topk_method="greedy" if not grouped else ("noaux_tc" if method == "noaux_tc" else "group_limited_greedy"),
        n_group=int(data["n_group"]) if grouped else 1,
        topk_group=int(data["topk_group"]) if grouped else 1,
        routed_scaling_factor=float(data["routed_scaling_factor"]),
    )


def parse_deepseek_v2(data: Json) -> ModelConfig:
    data = {**_DEEPSEEK_DEFAULTS["deepseek_v2"], **data}
    return ModelConfig(
        family="deepseek_v2",
        routing=_deepseek_routing(data, "softmax", ("greedy", "group_limited_greedy")),
        # transformers' DeepseekV2 (our numerical oracle) scales the top-k softmax scores and never
        # renormalises them, whatever `norm_topk_prob` says; every published V2 config sets it false.
        norm_topk_prob=False,
        **_deepseek_common(data),
    )


def parse_deepseek_v3(data: Json) -> ModelConfig:
    data = {**_DEEPSEEK_DEFAULTS["deepseek_v3"], **data}
    return ModelConfig(
        family="deepseek_v3",
        routing=_deepseek_routing(data, "sigmoid", ("noaux_tc",)),
        norm_topk_prob=bool(data["norm_topk_prob"]),
        **_deepseek_common(data),
    )


_GATE_UP_DOWN = ("gate_proj", "up_proj", "down_proj")

FAMILIES: dict[str, Family] = {
    "mixtral": Family(parse_mixtral, ("block_sparse_moe", "mlp"), ("w1", "w3", "w2")),
    "qwen2_moe": Family(parse_qwen2_moe, ("mlp",), _GATE_UP_DOWN),
    "qwen3_moe": Family(parse_qwen3_moe, ("mlp",), _GATE_UP_DOWN),
    "olmoe": Family(parse_olmoe, ("mlp",), _GATE_UP_DOWN),
    "deepseek_v2": Family(parse_deepseek_v2, ("mlp",), _GATE_UP_DOWN, shared_expert="shared_experts"),
    "deepseek_v3": Family(parse_deepseek_v3, ("mlp",), _GATE_UP_DOWN, shared_expert="shared_experts"),
}


def family_of(config: ModelConfig) -> Family:
    """The Family entry of `config.family`."""
    family = FAMILIES.get(config.family)
    if family is None:
        raise UnsupportedModelError(f"family {config.family!r} has no checkpoint layout registered")
    return family
