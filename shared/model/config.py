"""Model configuration: one frozen dataclass for every supported MoE decoder family.

A `ModelConfig` is what the forward path needs, independent of how a checkpoint spelled it; the
per-family translation from a Hugging Face `config.json` lives in `shared.model.families`.
`PRESETS` names real model shapes (for simulation and sizing) and a `tiny` one for tests.

Glossary: a *MoE layer* is a decoder layer whose MLP is a routed mixture of experts; other layers
have a dense MLP. Layer indices are absolute decoder layer indices (0-based).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from shared.dtypes import DTYPE_BYTES, DtypeName
from shared.model.errors import ConfigError

QKNorm = Literal["none", "per_head", "full"]
Scoring = Literal["softmax", "sigmoid"]
TopkMethod = Literal["greedy", "group_limited_greedy", "noaux_tc"]

# The families the forward path implements; `family` selects the attention and router variant.
SUPPORTED_FAMILIES: tuple[str, ...] = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding parameters (Hugging Face `rope_parameters` / `rope_scaling`).

    rope_type: "default", "linear", "dynamic", "yarn" or "llama3".
    theta: base wavelength. factor: context extension factor (1 for default).
    The remaining fields are used by yarn (beta_*, attention_factor, mscale*, truncate) and llama3
    (low/high_freq_factor); `original_max_position_embeddings` by both.
    """

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class MLAConfig:
    """DeepSeek multi-head latent attention (MLA) shapes.

    Keys and values are decompressed from a per-token latent of `kv_lora_rank` values (after an
    RMSNorm) plus one rotary key part of `qk_rope_head_dim` shared by all heads; the cache holds only
    those two. Each head's query / key has `qk_nope_head_dim` + `qk_rope_head_dim` dims, its value
    `v_head_dim`. `q_lora_rank` None projects queries directly (V2-Lite), else through a normed
    low-rank bottleneck. `rope_interleave`: rotary pairs are adjacent dims (V2 always; V3's flag).
    `attention_bias`: biases on q_a / kv_a / o projections.
    """

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    rope_interleave: bool = True
    attention_bias: bool = False

    @property
    def qk_head_dim(self) -> int:
        """Query / key dims per head (no-position part + rotary part)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_width(self) -> int:
        """Values cached per token and layer: the latent plus the shared rotary key."""
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class GroupRouting:
    """DeepSeek's router: expert scores, group-limited top-k, scaled weights.

    scoring: softmax (V2) or sigmoid (V3) of the gate logits, in fp32.
    topk_method: "greedy" (plain top-k), "group_limited_greedy" (V2: keep the `topk_group` groups
    with the highest max score), "noaux_tc" (V3: groups ranked by the sum of their top-2 scores
    plus `e_score_correction_bias`, which steers selection only, never the weights).
    Experts are split into `n_group` equal, contiguous groups. Weights are multiplied by
    `routed_scaling_factor` (after renormalisation when `ModelConfig.norm_topk_prob` applies).
    """

    scoring: Scoring
    topk_method: TopkMethod
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and options of one MoE decoder model.

    Sizes are counts (not bytes). `moe_layers` lists the decoder layers with routed experts (the
    others use a dense MLP of `intermediate_size`). `shared_expert_intermediate_size` > 0 adds a
    shared expert to every MoE layer (Qwen2-MoE), gated by sigmoid(h @ w) when
    `shared_expert_gate`. `norm_topk_prob`: renormalise the top-k router probabilities to sum 1.
    `router_weights_fp32`: keep the router weights in fp32 (Mixtral) instead of the model dtype.
    `qk_norm`: "per_head" RMS-normalises q and k per head (Qwen3-MoE), "full" over the whole
    projection (OLMoE). `clip_qkv` clamps q, k, v to [-c, c] (OLMoE). `sliding_layers` use a
    sliding attention window of `sliding_window` tokens.
    DeepSeek families set `mla` (then `head_dim` is the rotary dim, `num_kv_heads == num_heads`)
    and `routing`; their shared experts are `shared_expert_intermediate_size` wide, ungated.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    moe_layers: tuple[int, ...]
    intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False
    norm_topk_prob: bool = True
    router_weights_fp32: bool = False
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: QKNorm = "none"
    clip_qkv: float | None = None
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    mla: MLAConfig | None = None
    routing: GroupRouting | None = None

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def eos_token_id(self) -> int | None:
        """The first end-of-sequence id, or None."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def num_kv_groups(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    def expert_nbytes(self, dtype: DtypeName = "bfloat16") -> int:
        """Bytes of one routed expert (gate, up, down) at `dtype`: what a host's budget and the
        placement's slots are counted in."""
        return 3 * self.hidden_size * self.moe_intermediate_size * DTYPE_BYTES[dtype]

    def with_(self, **changes: object) -> ModelConfig:
        """A copy with `changes` applied (validated again)."""
        return replace(self, **changes)  # type: ignore[arg-type]


def list_moe_layers(config: ModelConfig) -> list[int]:
    """Absolute indices of the decoder layers that have routed experts, ascending."""
    return list(config.moe_layers)


def _validate(c: ModelConfig) -> None:
    positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "num_experts", "top_k", "moe_intermediate_size")
    for name in positive:
        if getattr(c, name) <= 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(c, name)}")
    if c.family not in SUPPORTED_FAMILIES:
        raise ConfigError(f"family {c.family!r} is not supported; accepted: {', '.join(SUPPORTED_FAMILIES)}")
    if c.num_heads % c.num_kv_heads:
        raise ConfigError(f"num_heads ({c.num_heads}) must be a multiple of num_kv_heads ({c.num_kv_heads})")
    if c.top_k > c.num_experts:
        raise ConfigError(f"top_k ({c.top_k}) must be <= num_experts ({c.num_experts})")
    if c.head_dim % 2:
        raise ConfigError(f"head_dim must be even for rotary embeddings, got {c.head_dim}")
    bad = [i for i in (*c.moe_layers, *c.sliding_layers) if not 0 <= i < c.num_layers]
    if bad:
        raise ConfigError(f"layer indices {bad} are outside 0..{c.num_layers - 1}")
    dense = c.num_layers - len(set(c.moe_layers))
    if dense and c.intermediate_size <= 0:
        raise ConfigError(f"{dense} dense layers need intermediate_size > 0")
    if c.sliding_layers and not c.sliding_window:
        raise ConfigError("sliding_layers are set but sliding_window is not")
    if c.family.startswith("deepseek"):
        _validate_deepseek(c)


def _validate_deepseek(c: ModelConfig) -> None:
    """MLA and group routing are present and consistent (each group must be able to fill top-k)."""
    if c.mla is None or c.routing is None:
        raise ConfigError(f"family {c.family} needs both `mla` and `routing` settings")
    m, r = c.mla, c.routing
    dims = {"kv_lora_rank": m.kv_lora_rank, "qk_nope_head_dim": m.qk_nope_head_dim,
            "qk_rope_head_dim": m.qk_rope_head_dim, "v_head_dim": m.v_head_dim,
            "q_lora_rank": m.q_lora_rank or 1, "n_group": r.n_group, "topk_group": r.topk_group}
    bad = {k: v for k, v in dims.items() if v <= 0}
    if bad:
        raise ConfigError(f"{', '.join(bad)} must be > 0, got {bad}")
    if c.head_dim != m.qk_rope_head_dim or c.num_kv_heads != c.num_heads:
        raise ConfigError("MLA configs need head_dim == qk_rope_head_dim and num_kv_heads == num_heads")
    if c.num_experts % r.n_group or r.topk_group > r.n_group:
        raise ConfigError(
            f"n_group ({r.n_group}) must divide num_experts ({c.num_experts}) and be >= topk_group ({r.topk_group})"
        )
    per_group = c.num_experts // r.n_group
    if r.topk_method != "greedy" and c.top_k > r.topk_group * per_group:
        raise ConfigError(f"top_k ({c.top_k}) exceeds the {r.topk_group} groups x {per_group} experts it may use")
    if r.topk_method == "noaux_tc" and per_group < 2:
        raise ConfigError(f"noaux_tc ranks groups by their top-2 scores; groups have {per_group} expert(s)")


def _all(n: int) -> tuple[int, ...]:
    return tuple(range(n))


# DeepSeek-V2(-Lite)'s yarn: 40x context extension of a 4096-token pretraining window.
_V2_LITE_YARN = RopeConfig("yarn", 10000.0, 40.0, 4096, mscale=0.707, mscale_all_dim=0.707)

PRESETS: dict[str, ModelConfig] = {
    # Same shape as tests/checkpoints.py's tiny Mixtral.
    "tiny": ModelConfig(
        family="mixtral", vocab_size=320, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, num_experts=8, top_k=2, moe_intermediate_size=96, moe_layers=_all(2),
        router_weights_fp32=True, rope=RopeConfig(theta=1e6), max_position_embeddings=256,
        bos_token_id=1, eos_token_ids=(2,), pad_token_id=0,
    ),
    # ~112M parameters, Mixtral-shaped (benchmarks).
    "mixtral-100m": ModelConfig(
        family="mixtral", vocab_size=32000, hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=2,
        head_dim=64, num_experts=8, top_k=2, moe_intermediate_size=1024, moe_layers=_all(6),
        router_weights_fp32=True, rope=RopeConfig(theta=1e6), max_position_embeddings=4096,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_ids=(2,),
    ),
    "mixtral-8x7b": ModelConfig(
        family="mixtral", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        head_dim=128, num_experts=8, top_k=2, moe_intermediate_size=14336, moe_layers=_all(32),
        router_weights_fp32=True, rope=RopeConfig(theta=1e6), max_position_embeddings=32768,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_ids=(2,),
    ),
    "qwen1.5-moe-a2.7b": ModelConfig(
        family="qwen2_moe", vocab_size=151936, hidden_size=2048, num_layers=24, num_heads=16,
        num_kv_heads=16, head_dim=128, num_experts=60, top_k=4, moe_intermediate_size=1408,
        moe_layers=_all(24), intermediate_size=5632, shared_expert_intermediate_size=5632,
        shared_expert_gate=True, norm_topk_prob=False, qkv_bias=True, rope=RopeConfig(theta=1e6),
        max_position_embeddings=8192, eos_token_ids=(151643,),
    ),
    "qwen3-30b-a3b": ModelConfig(
        family="qwen3_moe", vocab_size=151936, hidden_size=2048, num_layers=48, num_heads=32,
        num_kv_heads=4, head_dim=128, num_experts=128, top_k=8, moe_intermediate_size=768,
        moe_layers=_all(48), intermediate_size=6144, norm_topk_prob=True, qk_norm="per_head",
        rope=RopeConfig(theta=1e6), max_position_embeddings=40960, eos_token_ids=(151645,),
    ),
    "olmoe-1b-7b": ModelConfig(
        family="olmoe", vocab_size=50304, hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=16,
        head_dim=128, num_experts=64, top_k=8, moe_intermediate_size=1024, moe_layers=_all(16),
        norm_topk_prob=False, qk_norm="full", rms_norm_eps=1e-5, max_position_embeddings=4096,
        eos_token_ids=(50279,), pad_token_id=1,
    ),
    # DeepSeek-V2-Lite (15.7B): MLA without q-LoRA, layer 0 dense, 26 MoE layers x 64 experts, top-6, 2 shared.
    "deepseek-v2-lite": ModelConfig(
        family="deepseek_v2", vocab_size=102400, hidden_size=2048, num_layers=27, num_heads=16,
        num_kv_heads=16, head_dim=64, num_experts=64, top_k=6, moe_intermediate_size=1408,
        moe_layers=tuple(range(1, 27)), intermediate_size=10944, shared_expert_intermediate_size=2 * 1408,
        norm_topk_prob=False, router_weights_fp32=True, max_position_embeddings=163840,
        rope=_V2_LITE_YARN, mla=MLAConfig(512, 128, 64, 128), routing=GroupRouting("softmax", "greedy"),
        bos_token_id=100000, eos_token_ids=(100001,),
    ),
    # The same layer / expert / top-k / shared structure at tiny widths (simulation, benchmarks, tests).
    "deepseek-v2-lite-tiny": ModelConfig(
        family="deepseek_v2", vocab_size=320, hidden_size=64, num_layers=27, num_heads=4, num_kv_heads=4,
        head_dim=8, num_experts=64, top_k=6, moe_intermediate_size=32, moe_layers=tuple(range(1, 27)),
        intermediate_size=96, shared_expert_intermediate_size=2 * 32, norm_topk_prob=False,
        router_weights_fp32=True, max_position_embeddings=256,
        rope=RopeConfig("yarn", 10000.0, 4.0, 64, mscale=0.707, mscale_all_dim=0.707),
        mla=MLAConfig(32, 16, 8, 16), routing=GroupRouting("softmax", "greedy"),
        bos_token_id=1, eos_token_ids=(2,), pad_token_id=0,
    ),
}


def preset(name: str) -> ModelConfig:
    """The named preset config; raises ConfigError listing the accepted names."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; accepted: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
