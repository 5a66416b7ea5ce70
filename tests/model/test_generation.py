"""Sampling, in-process generation, the tokenizer, and dtypes other than fp32."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from shared.model.errors import CheckpointError, InputError
from shared.model.generate import generate
from shared.model.model import Batch, MoEModel
from shared.model.moe import LocalExperts
from shared.model.sampling import Sampler, SamplingParams, _top_p_filter
from shared.model.tokenizer import Tokenizer

PROMPTS = [[5, 17, 99, 3, 250, 41, 8, 77], [7, 8, 9], [300, 12, 44, 19, 2, 3, 90, 91, 92]]


def _load(path: Path, dtype: torch.dtype = torch.float32) -> tuple[MoEModel, LocalExperts]:
    return MoEModel.from_checkpoint(path, dtype=dtype), LocalExperts.from_checkpoint(path, dtype=dtype)


def test_sampling_params_are_validated() -> None:
    for kwargs, message in [({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
                            ({"top_p": 1.5}, "top_p"), ({"temperature": float("nan")}, "temperature")]:
        with pytest.raises(InputError, match=message):
            SamplingParams(**kwargs)


def test_greedy_and_top_p() -> None:
    logits = torch.tensor([0.1, 2.0, -1.0, 1.9])
    sampler = Sampler()
    assert sampler.sample(logits, SamplingParams()) == 1
    tiny_p = SamplingParams(temperature=1.0, top_p=1e-6, seed=3)
    assert {sampler.sample(logits, tiny_p, key=i) for i in range(20)} == {1}
    # extremes that once gave nan probabilities: a denormal temperature, a top_p below float32's range
    for extreme in (SamplingParams(1e-40, 1.0, 1), SamplingParams(1.0, 5e-324, 1), SamplingParams(5e-324, 5e-324)):
        assert {sampler.sample(logits, extreme, key=i) for i in range(10)} == {1}
    kept = _top_p_filter(torch.tensor([0.5, 0.2, 0.3]), 0.7)
    assert torch.allclose(kept, torch.tensor([0.5 / 0.8, 0.0, 0.3 / 0.8]))
    with pytest.raises(InputError, match=r"logits of shape \[V\]"):
        sampler.sample(logits[None], SamplingParams())


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_dir: Callable[..., Path]) -> None:
    model, experts = _load(tiny_dir("qwen3_moe"))
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    alone = generate(model, experts, [PROMPTS[1]], 12, params)[0]
    again = generate(model, experts, [PROMPTS[1]], 12, params)[0]
    mixed = generate(
        model, experts, PROMPTS, 12,
        [SamplingParams(temperature=0.7, seed=1), params, SamplingParams()],
    )
    assert alone == again == mixed[1]
    other = generate(model, experts, [PROMPTS[1]], 12, SamplingParams(temperature=1.0, top_p=0.9, seed=8))[0]
    assert other != alone
    assert all(0 <= t < model.config.vocab_size for t in alone)


def test_generate_stops_at_eos_and_checks_input(tiny_dir: Callable[..., Path]) -> None:
    model, experts = _load(tiny_dir("mixtral"))
    free = generate(model, experts, [PROMPTS[0]], 6, SamplingParams(), eos_token_id=[])[0]
    assert len(free) == 6
    stopped = generate(model, experts, [PROMPTS[0]], 6, SamplingParams(), eos_token_id=free[2])[0]
    assert stopped == free[: free.index(free[2]) + 1]
    with pytest.raises(InputError, match="prompt 1 is empty"):
        generate(model, experts, [[1], []], 4, SamplingParams())
    with pytest.raises(InputError, match=r"prompt 0 has token ids \[999\]"):
        generate(model, experts, [[999]], 4, SamplingParams())
    with pytest.raises(InputError, match="max_tokens must be >= 1"):
        generate(model, experts, [[1]], 0, SamplingParams())
    with pytest.raises(InputError, match="2 SamplingParams for 1 prompts"):
        generate(model, experts, [[1]], 2, [SamplingParams(), SamplingParams()])


def test_tokenizer_round_trip_and_streaming(tiny_dir: Callable[..., Path], tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(tiny_dir("mixtral"))
    assert tok.eos_token_id == 2
    assert tok.vocab_size == 320
    text = "Hello, wörld — the model says ✓ 42!"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == text
    assert "" in pieces  # a multi-byte character arrives over several byte tokens
    with pytest.raises(CheckpointError, match=r"no tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tracks_fp32(dtype: torch.dtype, tiny_dir: Callable[..., Path], hf_model: Any) -> None:
    path = tiny_dir("qwen2_moe")
    ours = {}
    for dt in (torch.float32, dtype):
        model, experts = _load(path, dt)
        cache = model.new_cache(3, 24)
        slots = [cache.allocate() for _ in PROMPTS]
        logits = model.forward(Batch(slots, PROMPTS), cache, experts)
        assert logits.dtype == dt
        assert model.new_cache(1, 1).keys[0].dtype == dt
        ours[dt] = logits.float()
    import transformers

    auto: Any = transformers.AutoModelForCausalLM
    hf = auto.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPTS[0]])).logits[0, -1].float()
    assert torch.isfinite(ours[dtype]).all()
    half_err = (ours[dtype] - ours[torch.float32]).abs().max().item()
    assert half_err < (0.1 if dtype == torch.bfloat16 else 0.02), half_err  # logits span about +-2.5
    assert (ours[dtype][0] - ref).abs().max().item() <= 0.02  # same rounding steps as transformers


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_cuda_matches_transformers(family: str, tiny_dir: Callable[..., Path], hf_model: Any) -> None:
    path = tiny_dir(family)
    model = MoEModel.from_checkpoint(path, device="cuda")
    experts = LocalExperts.from_checkpoint(path, device="cuda")
    cache = model.new_cache(3, 24)
    slots = [cache.allocate() for _ in PROMPTS]
    logits = model.forward(Batch(slots, PROMPTS), cache, experts).cpu()
    with torch.no_grad():
        for row, prompt in enumerate(PROMPTS):
            ref = hf_model(path)(torch.tensor([prompt])).logits[0, -1]
            assert (logits[row] - ref).abs().max().item() <= 1e-4
    greedy = generate(model, experts, PROMPTS, 8, SamplingParams())
    cpu_model, cpu_experts = _load(path)
    assert greedy == generate(cpu_model, cpu_experts, PROMPTS, 8, SamplingParams())
    bf16 = MoEModel.from_checkpoint(path, dtype=torch.bfloat16, device="cuda")
    bf16_experts = LocalExperts.from_checkpoint(path, dtype=torch.bfloat16, device="cuda")
    out = generate(bf16, bf16_experts, PROMPTS, 4, SamplingParams(temperature=0.8, seed=1))
    assert all(len(o) >= 1 for o in out)
