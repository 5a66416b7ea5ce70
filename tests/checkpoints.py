"""Tiny random Hugging Face MoE checkpoints, built offline, for tests and benchmarks.

`make_tiny_checkpoint(family, path)` writes a real checkpoint directory as `transformers` saves it
(`config.json`, `*.safetensors`, optionally sharded with `model.safetensors.index.json`, per-expert
or fused expert names) plus a deterministic byte-level BPE `tokenizer.json` whose vocabulary fits the
config. Same family, seed and overrides give the same bytes.

transformers is imported here (it is the oracle and a test dependency), never by `shared.model`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

FAMILIES: tuple[str, ...] = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")

# Special tokens at fixed ids (Mixtral's defaults: bos 1, eos 2); pad 0.
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
SPECIAL_TOKENS: tuple[str, ...] = ("<|pad|>", "<|bos|>", "<|eos|>")

# Fixed training text: the tokenizer is trained on it, so its merges are deterministic.
TOKENIZER_TEXT = """\
Prism serves one mixture-of-experts model across several edge servers.
Every node runs the dense part of the model; the routed experts are spread over the nodes.
A token whose chosen expert is not on its own node crosses the network.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
def forward(self, x):
    return self.down(silu(self.gate(x)) * self.up(x))
for i in range(10):
    print(i, i * i)
Hello, world! Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.
"""

_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    # Larger than the default 0.02 so that logits and router scores are well separated: greedy
    # parity must not hinge on near-ties decided by rounding.
    "initializer_range": 0.1,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "pad_token_id": PAD_ID,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "vocab_size": 320,
}

_DEEPSEEK_MLA: dict[str, Any] = {
    "num_key_value_heads": 4,  # MLA: one latent per token, as many kv heads as heads
    "intermediate_size": 96,  # the dense MLP of layers < first_k_dense_replace
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "n_routed_experts": 8,
    "num_experts_per_tok": 3,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
}

_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": {
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    },
    "qwen2_moe": {
        "intermediate_size": 128,  # the dense MLP of `mlp_only_layers`
        "moe_intermediate_size": 48,
        "shared_expert_intermediate_size": 96,
        "num_hidden_layers": 3,
        "mlp_only_layers": [1],
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": False,
    },
    "qwen3_moe": {
        "intermediate_size": 128,
        "moe_intermediate_size": 48,
        "head_dim": 32,  # not hidden / heads (16): exercises an explicit head_dim
        "num_hidden_layers": 2,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
    },
    "olmoe": {
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": False,
    },
    # V2-Lite's shape at tiny widths (no q-LoRA, yarn with mscale, layer 0 dense, 2 shared experts),
    # with V2's group-limited routing and a non-trivial scaling factor.
    "deepseek_v2": {
        **_DEEPSEEK_MLA,
        "q_lora_rank": None,
        "topk_method": "group_limited_greedy",
        "n_group": 4,
        "topk_group": 2,
        "n_shared_experts": 2,
        "routed_scaling_factor": 1.5,
        "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                            "original_max_position_embeddings": 64, "mscale": 0.707, "mscale_all_dim": 0.707},
    },
    # V3: q-LoRA, sigmoid scores with a correction bias (randomised at build time), noaux_tc groups.
    "deepseek_v3": {
        **_DEEPSEEK_MLA,
        "q_lora_rank": 24,
        "n_group": 4,
        "topk_group": 2,
        "n_shared_experts": 1,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
    },
}


def tiny_config(family: str, **overrides: Any) -> Any:
    """The transformers config object for a tiny `family` model (fp32), with `overrides` applied."""
    import transformers

    classes = {
        "mixtral": transformers.MixtralConfig,
        "qwen2_moe": transformers.Qwen2MoeConfig,
        "qwen3_moe": transformers.Qwen3MoeConfig,
        "olmoe": transformers.OlmoeConfig,
        "deepseek_v2": transformers.DeepseekV2Config,
        "deepseek_v3": transformers.DeepseekV3Config,
    }
    if family not in classes:
        raise ValueError(f"unknown family {family!r}; accepted: {', '.join(FAMILIES)}")
    kwargs = {**_COMMON, **_DEFAULTS[family], **overrides}
    config = classes[family](**kwargs)
    config.dtype = torch.float32
    return config


def make_tiny_checkpoint(
    family: str,
    path: Path,
    *,
    seed: int = 0,
    fused: bool = False,
    max_shard_size: int | str | None = None,
    **config_overrides: Any,
) -> Path:
    """Build a tiny random `family` model and save it as a Hugging Face checkpoint directory.

    family: one of FAMILIES ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3").
    path: directory to write (created if needed); returned.
    seed: seeds the weights (`torch.manual_seed`); same seed, same tensors.
    fused: write fused `experts.gate_up_proj [E, 2I, H]` / `experts.down_proj [E, H, I]` names
        (`save_original_format=False`) instead of the default per-expert names.
    max_shard_size: e.g. "40KB" to force several `*.safetensors` shards with an index.
    config_overrides: any config field (hidden_size, num_experts, rope_parameters, ...).
    """
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_config(family, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        auto: Any = transformers.AutoModelForCausalLM
        model = auto.from_config(config, dtype=torch.float32)
        _randomize_correction_bias(model)
    model.eval()
    save_kwargs: dict[str, Any] = {}
    if fused:
        save_kwargs["save_original_format"] = False
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **save_kwargs)
    write_tokenizer(path / "tokenizer.json", config.vocab_size)
    return path


def _randomize_correction_bias(model: Any) -> None:
    """DeepSeek-V3 initialises e_score_correction_bias to zeros; give it values that change which
    experts win (std 0.1 against sigmoid scores spread about as much) so tests see its effect."""
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape) * 0.1)


def write_tokenizer(path: Path, vocab_size: int) -> Path:
    """Train a byte-level BPE of at most `vocab_size` tokens on TOKENIZER_TEXT and save it as JSON.

    Ids 0, 1, 2 are `<|pad|>`, `<|bos|>`, `<|eos|>`; the 256 byte symbols follow, then merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    minimum = len(SPECIAL_TOKENS) + 256
    if vocab_size < minimum:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer (>= {minimum})")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([TOKENIZER_TEXT], trainer=trainer)
    tokenizer.save(str(path))
    _write_tokenizer_config(path.parent)
    return path


def _write_tokenizer_config(directory: Path) -> None:
    """A minimal tokenizer_config.json naming the special tokens (for tools that look for it)."""
    pad, bos, eos = SPECIAL_TOKENS
    data = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "tokenizer_class": "PreTrainedTokenizerFast"}
    (directory / "tokenizer_config.json").write_text(json.dumps(data, indent=2) + "\n")
