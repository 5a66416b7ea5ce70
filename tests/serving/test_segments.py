"""The executing node's side of routes without a bus: foreign KV admitted, checked, released, expired."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.gating.engine import ExpertsResult
from services.gating.routes import Segment, chains, segments
from services.gating.segments import SegmentRequest, SegmentRunner
from shared.errors import BadSegment, ExpertUnavailable, Overloaded
from shared.model.model import Batch, MoEModel
from shared.model.moe import LocalExperts, MoECall
from tests.checkpoints import make_tiny_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("seg"), seed=2, num_hidden_layers=4)


def runner(model_dir: Path, slots: int = 2, ttl_s: float = 60.0) -> SegmentRunner:
    model = MoEModel.from_checkpoint(model_dir)
    local = LocalExperts.from_checkpoint(model_dir)

    async def experts(call: MoECall, live: torch.Tensor) -> ExpertsResult:
        return ExpertsResult(local(call), None)

    return SegmentRunner("b", model, experts, max_slots=slots, max_len=64, idle_ttl_s=ttl_s, inline_max_tokens=64)


def request(seqs: list[str], counts: list[int], lens: list[int], start: int = 1, end: int = 3) -> SegmentRequest:
    return SegmentRequest("a", seqs, counts, lens, [Segment(start, end, "b")])


def test_routes_split_into_segments_and_chains() -> None:
    route = ("a", "b", "b", "a", "c", "b")
    assert segments(route) == [Segment(0, 1, "a"), Segment(1, 3, "b"), Segment(3, 4, "a"), Segment(4, 5, "c"),
                               Segment(5, 6, "b")]
    assert chains(route, "a") == [Segment(0, 1, "a"), (Segment(1, 3, "b"),), Segment(3, 4, "a"),
                                  (Segment(4, 5, "c"), Segment(5, 6, "b"))]


def layers(model: MoEModel, local: LocalExperts, tokens: list[int], end: int) -> torch.Tensor:
    """x after layers 0 .. end - 1 of a first step of `tokens`, the model in one process."""
    cache = model.new_cache(1, 64)
    step = model.begin_step(Batch([cache.allocate()], [tokens]), cache)
    gen = model.layer_steps(step, step.embed(model.embed), 0, end)
    try:
        call = next(gen)
        while True:
            call = gen.send(local(call))
    except StopIteration as done:
        x: torch.Tensor = done.value
        return x


async def test_a_segment_computes_what_the_model_computes_and_keeps_its_kv(model_dir: Path) -> None:
    seg = runner(model_dir)
    local = LocalExperts.from_checkpoint(model_dir)
    x1, want = (layers(seg.model, local, [5, 6, 7], end) for end in (1, 3))
    got, activations = await seg.run(x1, request(["a/1"], [3], [0]))  # layers 1-2 here
    assert torch.equal(got, want)
    assert [a[0] for a in activations] == [1, 2]  # the MoE layers it ran, for the home's counts
    assert seg.cache.length(seg.slots[("a/1", 1)]) == 3
    d = seg.model.config.hidden_size
    with pytest.raises(BadSegment, match="3 tokens cached here, 2 at home"):
        await seg.run(torch.zeros(1, d), request(["a/1"], [1], [2]))
    with pytest.raises(BadSegment, match="holds no KV for request a/9"):
        await seg.run(torch.zeros(1, d), request(["a/9"], [1], [4]))


async def test_foreign_kv_is_released_expired_and_bounded(model_dir: Path) -> None:
    seg = runner(model_dir, slots=2, ttl_s=5.0)
    d = seg.model.config.hidden_size
    await seg.run(torch.randn(2, d), request(["a/1", "a/2"], [1, 1], [0, 0]))
    with pytest.raises(Overloaded):  # both slots hold a request's KV
        await seg.run(torch.randn(1, d), request(["a/3"], [1], [0]))
    assert seg.release(["a/1"]) == 1
    await seg.run(torch.randn(1, d), request(["a/3"], [1], [0]))
    # KV is held per (request, segment start): a route that visits a node twice has two there.
    assert set(seg.slots) == {("a/2", 1), ("a/3", 1)}
    seg.expire(max(seg.last_used.values()) + 6.0)  # the home stopped answering: gone after the TTL
    assert seg.slots == {}
    assert seg.cache.num_free() == 2


async def test_segments_of_one_layer_range_from_two_homes_run_as_one_batch(model_dir: Path) -> None:
    seg = runner(model_dir, slots=4)
    local = LocalExperts.from_checkpoint(model_dir)
    x_a, want_a = (layers(seg.model, local, [5, 6, 7], end) for end in (1, 3))
    x_c, want_c = (layers(seg.model, local, [9, 10], end) for end in (1, 3))
    bad = SegmentRequest("c", ["c/9"], [1], [4], [Segment(1, 3, "b")])  # no KV here: fails alone
    results = await seg.run_many([
        (x_a, request(["a/1"], [3], [0])),
        (torch.zeros(1, seg.model.config.hidden_size), bad),
        (x_c, SegmentRequest("c", ["c/1"], [2], [0], [Segment(1, 3, "b")])),
    ])
    assert isinstance(results[1], BadSegment)
    (got_a, acts_a), (got_c, acts_c) = results[0], results[2]  # type: ignore[misc]
    assert torch.allclose(got_a, want_a, atol=1e-5)  # batched with another sequence: same math, other blocking
    assert torch.allclose(got_c, want_c, atol=1e-5)
    assert (seg.forwards, seg.segments_run) == (1, 2)
    assert [a[3] for a in acts_a] == [3, 3]  # each home's own tokens, per MoE layer
    assert [a[3] for a in acts_c] == [2, 2]


async def test_an_expert_that_does_not_answer_fails_only_the_segments_whose_rows_chose_it(model_dir: Path) -> None:
    """Two homes' segments in one batch: the first MoE call's dispatch reports home a's tokens failed (an
    expert they chose did not answer). a's segment fails; c's goes on without a's rows and is exact."""
    model = MoEModel.from_checkpoint(model_dir)
    local = LocalExperts.from_checkpoint(model_dir)
    lives: list[list[bool] | None] = []
    dead_rows = [3]  # the next call's first rows whose expert does not answer (a's three tokens), then none

    async def experts(call: MoECall, live: torch.Tensor | None) -> ExpertsResult:
        lives.append(None if live is None else live.tolist())
        if not dead_rows:
            return ExpertsResult(local(call), None)
        failed = torch.zeros(call.hidden.shape[0], dtype=torch.bool)
        failed[: dead_rows.pop()] = True
        return ExpertsResult(local(call), failed, ExpertUnavailable("expert 1.4: no answer within 2 s"))

    seg = SegmentRunner("b", model, experts, max_slots=4, max_len=64, idle_ttl_s=60.0, inline_max_tokens=64)
    x_a = layers(model, local, [5, 6, 7], 1)
    x_c, want_c = (layers(model, local, [9, 10], end) for end in (1, 3))
    failed_a, (got_c, acts_c) = await seg.run_many([
        (x_a, request(["a/1"], [3], [0])),
        (x_c, SegmentRequest("c", ["c/1"], [2], [0], [Segment(1, 3, "b")])),
    ])  # type: ignore[misc]
    assert isinstance(failed_a, ExpertUnavailable)
    assert torch.allclose(got_c, want_c, atol=1e-5)
    assert lives == [None, [False] * 3 + [True] * 2]  # the second MoE layer leaves a's rows out
    assert [a[3] for a in acts_c] == [2, 2]
    assert seg.cache.length(seg.slots[("a/1", 1)]) == 0  # a's KV did not advance: its home fails the request
    assert seg.cache.length(seg.slots[("c/1", 1)]) == 2
    lives.clear()
    dead_rows.append(1)  # c's next step, alone: its only token fails at the first MoE layer
    (alone,) = await seg.run_many([(torch.randn(1, model.config.hidden_size),
                                    SegmentRequest("c", ["c/1"], [1], [2], [Segment(1, 3, "b")]))])
    assert isinstance(alone, ExpertUnavailable)
    assert len(lives) == 1  # nothing left to compute: no second MoE layer
    assert seg.cache.length(seg.slots[("c/1", 1)]) == 2
