"""Numerical parity with transformers (the oracle) for every family, on tiny random checkpoints.

Logits must agree to 1e-4 (fp32) over a 20-token prefill plus 8 cached decode steps, at batch 1
and in a ragged batch of 3 that mixes prefill and decode in one step; greedy generation must give
the same 16 tokens as transformers' `generate`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from shared.model.generate import generate
from shared.model.model import Batch, MoEModel
from shared.model.moe import LocalExperts
from shared.model.sampling import SamplingParams

TOL = 1e-4


def _prompt(n: int, seed: int, vocab: int = 320) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def _load(path: Path) -> tuple[MoEModel, LocalExperts]:
    return MoEModel.from_checkpoint(path), LocalExperts.from_checkpoint(path)


def check_batch1(path: Path, hf: Any, prompt_len: int = 20, steps: int = 8) -> None:
    """Prefill + cached greedy decode, compared step by step with transformers' own cache."""
    model, experts = _load(path)
    prompt = _prompt(prompt_len, seed=1, vocab=model.config.vocab_size)
    cache = model.new_cache(1, prompt_len + steps + 1)
    slot = cache.allocate()
    ours = model.forward(Batch([slot], [prompt]), cache, experts, all_logits=True)
    _reset_dynamic_rope(hf)
    with torch.no_grad():
        out = hf(torch.tensor([prompt]), use_cache=True)
    assert ours.shape == out.logits[0].shape
    assert (ours - out.logits[0]).abs().max().item() <= TOL
    hf_cache, token = out.cache, int(out.logits[0, -1].argmax())
    for _ in range(steps):
        ours = model.forward(Batch([slot], [[token]]), cache, experts)[0]
        with torch.no_grad():
            out = hf(torch.tensor([[token]]), cache=hf_cache, use_cache=True)
        ref = out.logits[0, -1]
        assert (ours - ref).abs().max().item() <= TOL
        hf_cache, token = out.cache, int(ref.argmax())
    assert cache.length(slot) == prompt_len + steps


def _reset_dynamic_rope(hf: Any) -> None:
    """transformers' dynamic RoPE keeps the longest length seen so far in the module; start each
    reference sequence afresh, as a new process would."""
    rotary = hf.model.rotary_emb
    rotary.inv_freq = rotary.original_inv_freq.clone()
    rotary.max_seq_len_cached = rotary.original_max_seq_len


def _hf_replay(hf: Any, chunks: list[list[int]]) -> torch.Tensor:
    """`hf_chunk_logits` for a new sequence."""
    _reset_dynamic_rope(hf)
    return hf_chunk_logits(hf, chunks)


def hf_chunk_logits(hf: Any, chunks: list[list[int]]) -> torch.Tensor:
    """transformers' logits for every token, fed chunk by chunk through its own cache: [n, V]."""
    cache, out = None, []
    with torch.no_grad():
        for chunk in chunks:
            step = hf(torch.tensor([chunk]), cache=cache, use_cache=True)
            cache = step.cache
            out.append(step.logits[0])
    return torch.cat(out)


def check_ragged(path: Path, hf: Any, steps: int = 8) -> None:
    """Three sequences of different lengths in one cache; the third joins (prefill) while the
    others decode. Each sequence is compared with transformers run on it alone, fed the same
    chunks (prompt, then one token per step)."""
    model, experts = _load(path)
    V = model.config.vocab_size
    prompts = [_prompt(17, 2, V), _prompt(5, 3, V), _prompt(11, 4, V)]
    cache = model.new_cache(4, 40)
    slots = [cache.allocate() for _ in prompts]
    chunks: list[list[list[int]]] = [[prompts[0]], [prompts[1]], []]
    got: list[list[torch.Tensor]] = [[], [], []]
    logits = model.forward(Batch(slots[:2], prompts[:2]), cache, experts, all_logits=True)
    got[0] += list(logits[:17])
    got[1] += list(logits[17:])
    for step in range(steps):
        toks = [[int(got[i][-1].argmax())] for i in (0, 1)]
        toks.append(prompts[2] if step == 0 else [int(got[2][-1].argmax())])  # slot 2 joins at step 0
        logits = model.forward(Batch(slots, toks), cache, experts, all_logits=True)
        offset = 0
        for i, t in enumerate(toks):
            chunks[i].append(t)
            got[i] += list(logits[offset : offset + len(t)])
            offset += len(t)
    for i in range(3):
        ref = _hf_replay(hf, chunks[i])
        ours = torch.stack(got[i])
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() <= TOL, f"sequence {i}"


def check_greedy(path: Path, hf: Any, n: int = 16) -> None:
    model, experts = _load(path)
    prompts = [_prompt(12, 5, model.config.vocab_size), _prompt(7, 6, model.config.vocab_size)]
    ours = generate(model, experts, prompts, n, SamplingParams())
    for prompt, mine in zip(prompts, ours, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0, len(prompt) :]
        assert mine == ref.tolist()


def test_batch1_prefill_and_decode(family: str, tiny_dir: Callable[..., Path], hf_model: Any) -> None:
    path = tiny_dir(family)
    check_batch1(path, hf_model(path))


def test_ragged_batch_of_three(family: str, tiny_dir: Callable[..., Path], hf_model: Any) -> None:
    path = tiny_dir(family)
    check_ragged(path, hf_model(path))


def test_greedy_generation_matches_transformers(
    family: str, tiny_dir: Callable[..., Path], hf_model: Any
) -> None:
    path = tiny_dir(family)
    check_greedy(path, hf_model(path))


# Config variants: each options set changes a code path (RoPE rule, window, dense layers, ...).
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("mixtral", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}),
    ("mixtral", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
                 "max_position_embeddings": 16, "head_dim": 16}),  # transformers needs head_dim here
    ("qwen3_moe", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                       "original_max_position_embeddings": 64}}),
    ("olmoe", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 10000.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 16}}),
    ("mixtral", {"sliding_window": 6}),
    ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 2}),
    ("qwen2_moe", {"num_hidden_layers": 4, "mlp_only_layers": [], "decoder_sparse_step": 2,
                   "norm_topk_prob": True}),
    ("olmoe", {"clip_qkv": 0.5, "attention_bias": True}),
    ("qwen3_moe", {"tie_word_embeddings": True, "num_key_value_heads": 4, "norm_topk_prob": False,
                   "num_experts": 6, "num_experts_per_tok": 3}),
    ("mixtral", {"num_key_value_heads": 1, "num_local_experts": 4, "num_experts_per_tok": 1}),
]


@pytest.mark.parametrize(("family_name", "options"), VARIANTS, ids=lambda v: str(v)[:40])
def test_config_variants(
    family_name: str, options: dict[str, Any], tiny_dir: Callable[..., Path], hf_model: Any
) -> None:
    path = tiny_dir(family_name, **options)
    hf = hf_model(path)
    check_batch1(path, hf)
    check_ragged(path, hf, steps=3)
