"""The expert seam: grouping, combining, LocalExperts, and driving forward_steps from elsewhere."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from shared.model.errors import InputError
from shared.model.model import Batch, MoEModel
from shared.model.moe import (
    SMALL_CALL,
    ExpertWeights,
    LocalExperts,
    MoECall,
    Routing,
    combine,
    expert_forward,
)

PROMPTS = [[5, 17, 99, 3, 250, 41, 8, 77, 120, 64, 9, 31, 200, 11, 6, 150], [7, 8, 9], [300, 12, 44, 19, 2, 3]]


@st.composite
def routings(draw: st.DrawFn) -> torch.Tensor:
    E = draw(st.integers(1, 12))
    K = draw(st.integers(1, E))
    T = draw(st.integers(0, 20))
    rows = [draw(st.permutations(range(E)))[:K] for _ in range(T)]
    return torch.tensor(rows, dtype=torch.int64).reshape(T, K)


@settings(max_examples=60, deadline=None)
@given(routings(), st.data())
def test_routing_sorts_choices_by_expert(expert_ids: torch.Tensor, data: st.DataObject) -> None:
    T, K = expert_ids.shape
    live = torch.tensor(data.draw(st.lists(st.booleans(), min_size=T, max_size=T)), dtype=torch.bool)
    routing = Routing.of(expert_ids, live)
    kept = {(t, k) for t in range(T) for k in range(K) if live[t]}
    assert routing.experts == sorted({int(expert_ids[t, k]) for t, k in kept})
    assert sum(routing.counts) == routing.order.numel() == len(kept)
    assert {(int(o) // K, int(o) % K) for o in routing.order} == kept
    for expert, (start, end) in routing.spans.items():
        tokens = routing.token_idx[start:end].tolist()
        assert tokens == sorted(tokens)
        assert (expert_ids.reshape(-1)[routing.order[start:end]] == expert).all()
    hidden = torch.randn(T, 3)
    assert torch.equal(routing.rows(hidden), hidden[routing.token_idx])


@settings(max_examples=60, deadline=None)
@given(routings())
def test_a_few_choices_sort_in_python_as_the_tensor_path_does(expert_ids: torch.Tensor) -> None:
    """Up to SMALL_CALL choices `Routing.of` sorts in plain Python; the block is the tensor path's, field
    for field (an all-live mask takes the tensor path)."""
    assume(expert_ids.numel() <= SMALL_CALL)
    few = Routing.of(expert_ids)
    tensors = Routing.of(expert_ids, torch.ones(expert_ids.shape[0], dtype=torch.bool))
    assert (few.experts, few.counts) == (tensors.experts, tensors.counts)
    assert torch.equal(few.order, tensors.order)
    assert torch.equal(few.token_idx, tensors.token_idx)
    assert few.order.dtype == few.token_idx.dtype == torch.int64


def _random_experts(E: int, D: int, inner: int, seed: int = 0) -> dict[int, ExpertWeights]:
    g = torch.Generator().manual_seed(seed)
    return {e: ExpertWeights(*(torch.randn(s, generator=g) * 0.2 for s in ((inner, D), (inner, D), (D, inner))))
            for e in range(E)}


@pytest.mark.parametrize("K", [1, 2, 4])
def test_combine_equals_per_token_sum(K: int) -> None:
    T, D, E = 9, 16, 5
    experts = _random_experts(E, D, 24)
    g = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    call = MoECall(3, torch.randn(T, D, generator=g), ids, torch.rand(T, K, generator=g))
    routing = Routing.of(ids)
    rows = routing.rows(call.hidden)
    outputs = torch.cat([expert_forward(experts[e], rows[start:end]) for e, (start, end) in routing.spans.items()])
    out = combine(call, routing, outputs)
    for t in range(T):
        expect = sum(call.weights[t, k] * expert_forward(experts[int(ids[t, k])], call.hidden[t : t + 1])[0]
                     for k in range(K))
        assert torch.allclose(out[t], expect, atol=1e-6)
    # bit for bit the arithmetic of transformers' loop: one index_add_ per expert, experts ascending
    loop = torch.zeros(T, D)
    for start, end in routing.spans.values():
        token, k = routing.token_idx[start:end], routing.order[start:end] % K
        loop.index_add_(0, token, outputs[start:end] * call.weights[token, k, None])
    assert torch.equal(out, loop)
    with pytest.raises(InputError, match="expert outputs of shape"):
        combine(call, routing, outputs[1:])


def _unaligned_copy(t: torch.Tensor) -> torch.Tensor:
    """The tensor as a network decode would give it: a zero-copy view at an odd byte offset."""
    raw = bytearray(4) + t.numpy().tobytes()
    view = torch.from_numpy(np.frombuffer(raw, dtype=np.float32, offset=4).reshape(t.shape))
    assert view.data_ptr() % 16 != 0 or t.numel() == 0
    return view


def test_remote_path_is_bit_identical_to_local(tiny_dir: Callable[..., Path]) -> None:
    """Each group sent 'over the wire' (bytes, unaligned decode) and combined gives the same bits."""
    path = tiny_dir("mixtral")
    model, local = MoEModel.from_checkpoint(path), LocalExperts.from_checkpoint(path)

    def remote(call: MoECall) -> torch.Tensor:
        routing = Routing.of(call.expert_ids)
        wire_rows = _unaligned_copy(routing.rows(call.hidden))
        outputs = []
        for expert, (start, end) in routing.spans.items():
            weights = local.weights[(call.layer, expert)]
            host_copy = ExpertWeights(*(_unaligned_copy(w) for w in (weights.gate, weights.up, weights.down)))
            outputs.append(expert_forward(host_copy, wire_rows[start:end]))
        return combine(call, routing, _unaligned_copy(torch.cat(outputs)))

    for batch_prompts in (PROMPTS[:1], PROMPTS):
        results = []
        for experts in (local, remote):
            cache = model.new_cache(3, 40)
            slots = [cache.allocate() for _ in batch_prompts]
            logits = model.forward(Batch(slots, batch_prompts), cache, experts)
            step = model.forward(Batch(slots, [[int(x)] for x in logits.argmax(-1)]), cache, experts)
            results.append(torch.cat([logits, step]))
        assert torch.equal(results[0], results[1])


def test_generator_resumed_from_other_threads(tiny_dir: Callable[..., Path]) -> None:
    path = tiny_dir("qwen2_moe")
    model, experts = MoEModel.from_checkpoint(path), LocalExperts.from_checkpoint(path)
    cache = model.new_cache(3, 40)
    slots = [cache.allocate() for _ in PROMPTS]
    expected = model.forward(Batch(slots, PROMPTS), cache, experts)
    for slot in slots:
        cache.reset(slot)
    layers = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        steps = model.forward_steps(Batch(slots, PROMPTS), cache)
        call = pool.submit(next, steps).result()
        while True:
            layers.append(call.layer)
            assert call.hidden.shape == (sum(map(len, PROMPTS)), 64)
            assert call.expert_ids.shape == call.weights.shape == (call.hidden.shape[0], 2)
            routed = pool.submit(experts, call).result()
            try:
                call = pool.submit(steps.send, routed).result()
            except StopIteration as done:
                logits = done.value
                break
    assert layers == [0, 2]  # layer 1 of the tiny Qwen2-MoE is dense
    assert torch.equal(logits, expected)
    assert [cache.length(s) for s in slots] == [len(p) for p in PROMPTS]


def test_wrong_routed_output_is_rejected(tiny_dir: Callable[..., Path]) -> None:
    path = tiny_dir("mixtral")
    model = MoEModel.from_checkpoint(path)
    cache = model.new_cache(1, 8)
    slot = cache.allocate()
    steps = model.forward_steps(Batch([slot], [[1, 2, 3]]), cache)
    next(steps)
    with pytest.raises(InputError, match=r"routed output must be a tensor of shape \(3, 64\)"):
        steps.send(torch.zeros(2, 64))
    assert cache.length(slot) == 0


def test_local_experts_subset(tiny_dir: Callable[..., Path]) -> None:
    path = tiny_dir("olmoe")
    subset = LocalExperts.from_checkpoint(path, keys=[(0, 1), (1, 5)])
    assert set(subset.weights) == {(0, 1), (1, 5)}
    assert subset.nbytes() == 2 * 3 * 48 * 64 * 4
    call = MoECall(0, torch.randn(2, 64), torch.tensor([[1, 2], [1, 3]]), torch.ones(2, 2))
    with pytest.raises(InputError, match=r"expert \(0, 2\) is not held"):
        subset(call)
    full = LocalExperts.from_checkpoint(path, dtype=torch.bfloat16)
    assert len(full.weights) == 16
    assert full.weights[(1, 7)].gate.dtype == torch.bfloat16


def test_batch_validation(tiny_dir: Callable[..., Path]) -> None:
    path = tiny_dir("mixtral")
    model, experts = MoEModel.from_checkpoint(path), LocalExperts.from_checkpoint(path)
    cache = model.new_cache(2, 8)
    slot = cache.allocate()
    cases = [
        (Batch([1], [[1]]), "slot 1 is not allocated"),
        (Batch([slot, slot], [[1], [2]]), "lists a cache slot twice"),
        (Batch([slot], [[]]), "at least one token"),
        (Batch([slot], [[1, 320]]), r"token ids \[320\] outside the vocabulary 0..319"),
        (Batch([slot], [list(range(9))]), "exceed max_len 8"),
        (Batch([slot], [[1], [2]]), "one token list per slot"),
    ]
    for batch, message in cases:
        with pytest.raises(InputError, match=message):
            model.forward(batch, cache, experts)
    cache.allocate()
    with pytest.raises(InputError, match="all 2 slots are in use"):
        cache.allocate()


def test_model_path_does_not_import_transformers() -> None:
    code = (
        "import sys; import shared.model.model, shared.model.generate, shared.model.tokenizer, "
        "shared.model.sampling, shared.model.checkpoint; "
        "sys.exit('transformers' in sys.modules)"
    )
    root = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], cwd=root, check=False).returncode == 0


def test_expert_weights_layout() -> None:
    g = torch.Generator().manual_seed(0)
    gate, up, down = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g), torch.randn(4, 6, generator=g)
    w = ExpertWeights(gate, up, down)
    assert w.gate_up.shape == (12, 4)
    assert w.gate.data_ptr() == w.gate_up.data_ptr()  # views of the fused buffer, no second copy
    assert torch.equal(w.gate, gate)
    assert torch.equal(w.up, up)
    assert w.nbytes() == 3 * 6 * 4 * 4
    x = torch.randn(3, 4, generator=g)
    expect = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
    assert torch.allclose(expert_forward(w, x), expect, atol=1e-6)
    again = ExpertWeights(w.gate, w.up, w.down)  # already fused: the buffer is reused
    assert again.gate_up.data_ptr() == w.gate_up.data_ptr()
    half = w.to(dtype=torch.bfloat16)
    assert half.gate_up.dtype == torch.bfloat16
    assert half.gate.data_ptr() == half.gate_up.data_ptr()
    with pytest.raises(InputError, match=r"gate \[I, D\], up \[I, D\], down \[D, I\]"):
        ExpertWeights(gate, up, down.T.contiguous())
