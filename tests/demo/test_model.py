"""The shipped demo checkpoint: Prism's model loads it and generates deterministically, and
transformers (the numerical reference) agrees on its logits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from shared.model.generate import generate
from shared.model.model import Batch, MoEModel
from shared.model.moe import LocalExperts
from shared.model.sampling import SamplingParams
from shared.model.tokenizer import Tokenizer
from shared.workloads import Workloads

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo"


@pytest.fixture(scope="module")
def prism() -> tuple[MoEModel, LocalExperts, Tokenizer]:
    return MoEModel.from_checkpoint(DEMO), LocalExperts.from_checkpoint(DEMO), Tokenizer.from_dir(DEMO)


@pytest.fixture(scope="module")
def prompts(prism: tuple[MoEModel, LocalExperts, Tokenizer]) -> dict[str, list[int]]:
    tok = prism[2]
    workloads = Workloads.load()
    return {d: tok.encode(workloads.prompts(d)[0].text) for d in workloads.domains}


def test_shipped_files_are_small_and_describe_a_many_expert_moe() -> None:
    sizes = {f.name: f.stat().st_size for f in DEMO.iterdir() if f.is_file()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "metrics.json"} <= set(sizes)
    assert sum(sizes.values()) <= 50 * 2**20
    config = json.loads((DEMO / "config.json").read_text())
    assert config["model_type"] == "mixtral"
    assert config["num_local_experts"] >= 16
    assert config["num_experts_per_tok"] == 2


def test_transformers_agrees_on_the_logits(
    prism: tuple[MoEModel, LocalExperts, Tokenizer], prompts: dict[str, list[int]]
) -> None:
    from transformers import AutoModelForCausalLM

    model, experts, _ = prism
    reference: Any = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32)
    reference.eval()
    for ids in prompts.values():
        cache = model.new_cache(1, len(ids))
        ours = model.forward(Batch([cache.allocate()], [ids]), cache, experts, all_logits=True)  # [T, V]
        with torch.inference_mode():
            theirs = reference(torch.tensor([ids])).logits[0]
        assert ours.shape == theirs.shape
        assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), float((ours - theirs).abs().max())


def test_generation_is_deterministic(
    prism: tuple[MoEModel, LocalExperts, Tokenizer], prompts: dict[str, list[int]]
) -> None:
    model, experts, tok = prism
    batch = list(prompts.values())
    greedy = generate(model, experts, batch, 12, SamplingParams())
    assert greedy == generate(model, experts, batch, 12, SamplingParams())
    # each prompt alone gives the same greedy tokens as in the batch
    assert [generate(model, experts, [p], 12, SamplingParams())[0] for p in batch] == greedy
    sampled = [SamplingParams(temperature=0.8, seed=i) for i in range(len(batch))]
    first = generate(model, experts, batch, 12, sampled)
    assert first == generate(model, experts, batch, 12, sampled)
    assert all(len(out) >= 1 and all(0 <= t < tok.vocab_size for t in out) for out in first)
