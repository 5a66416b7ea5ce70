"""`prism trace`: run a workload scenario through the model in one process and write its routing trace.

    prism trace --model models/demo --scenario switch-3 --out var/switch-3.npz \
        [--requests 50] [--max-tokens 32] [--seed 0] [--temperature 0.8] [--batch 8]

Requests are drawn from the scenario (`shared.workloads`) and served in arrival order, `--batch`
at a time: one prefill step for the batch's prompts, then one decode step per generated token.
Every token that passes the MoE layers is recorded (prompt tokens, then each generated token when
it is fed back), in the order the steps process them. The trace format is that of
`services.placement.traces.RoutingTrace` (see its docstring); the meta also records the scenario,
seed, requests per node, max tokens and temperature.

Shape legend: T tokens of a step (sequences packed in batch order), L MoE layers, K top-k.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli import DEMO_MODEL

if TYPE_CHECKING:
    import numpy as np
    from torch import Tensor

    from services.placement.traces import RoutingTrace
    from shared.model.model import MoEModel
    from shared.model.moe import MoECall
    from shared.workloads import Request


class RoutingRecorder:
    """Wraps an experts callable and keeps the routing of each MoE layer of the current step."""

    def __init__(self, experts: Callable[[MoECall], Tensor], moe_layers: Sequence[int]) -> None:
        self.experts = experts
        self.moe_layers = tuple(moe_layers)
        self._step: dict[int, tuple[Tensor, Tensor]] = {}

    def __call__(self, call: MoECall) -> Tensor:
        self._step[call.layer] = (call.expert_ids.detach().cpu(), call.weights.detach().float().cpu())
        return self.experts(call)

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        """experts [T, L, K] int64 and weights [T, L, K] float32 of the last step, each token's
        top-k by descending weight; clears the record."""
        import torch

        missing = [layer for layer in self.moe_layers if layer not in self._step]
        if missing:
            raise RuntimeError(f"no routing was recorded for MoE layers {missing} in this step")
        ids = torch.stack([self._step[layer][0] for layer in self.moe_layers], dim=1)  # [T, L, K]
        weights = torch.stack([self._step[layer][1] for layer in self.moe_layers], dim=1)  # [T, L, K]
        order = torch.argsort(weights, dim=-1, descending=True, stable=True)
        self._step.clear()
        return torch.gather(ids, -1, order).numpy(), torch.gather(weights, -1, order).numpy()


@dataclass
class _Rows:
    """Per-token columns of the trace, appended step by step."""

    experts: list[np.ndarray] = field(default_factory=list)
    weights: list[np.ndarray] = field(default_factory=list)
    node: list[int] = field(default_factory=list)
    domain: list[int] = field(default_factory=list)
    request: list[int] = field(default_factory=list)
    position: list[int] = field(default_factory=list)

    def add_step(self, recorder: RoutingRecorder, owners: list[tuple[int, int, int, int, int]]) -> None:
        """Append one step; owners holds (node, domain, request, first position, tokens) per sequence."""
        experts, weights = recorder.take()
        self.experts.append(experts)
        self.weights.append(weights)
        for node, domain, request, first, count in owners:
            self.node += [node] * count
            self.domain += [domain] * count
            self.request += [request] * count
            self.position += list(range(first, first + count))
        if len(self.node) != sum(len(e) for e in self.experts):
            raise RuntimeError("the step's routed tokens do not match the tokens fed to it")


@dataclass(frozen=True)
class TraceSettings:
    """What `record_trace` runs: generation length, sampling and how many requests share a batch."""

    max_tokens: int
    temperature: float = 0.8
    seed: int = 0
    batch: int = 8


def _serve_batch(
    model: MoEModel, recorder: RoutingRecorder, prompts: list[list[int]], tags: list[tuple[int, int, int]],
    *, settings: TraceSettings, rows: _Rows,
) -> None:
    """Prefill then decode one batch of requests; tags holds (node, domain, request id) per prompt."""
    from shared.model.model import Batch
    from shared.model.sampling import Sampler, SamplingParams

    cache = model.new_cache(len(prompts), max(len(p) for p in prompts) + settings.max_tokens)
    slots = [cache.allocate() for _ in prompts]
    sampler = Sampler()
    params = [SamplingParams(settings.temperature, 1.0, settings.seed * 1_000_003 + rid) for _, _, rid in tags]
    stop = set(model.config.eos_token_ids)
    lengths = [len(p) for p in prompts]
    logits = model.forward(Batch(slots, prompts), cache, recorder)  # [B, V]
    rows.add_step(recorder, [(*tag, 0, n) for tag, n in zip(tags, lengths, strict=True)])
    active, generated = list(range(len(prompts))), [0] * len(prompts)
    while active:
        fed = []
        for row, i in enumerate(active):
            token = sampler.sample(logits[row], params[i], key=i)
            generated[i] += 1
            if token not in stop and generated[i] < settings.max_tokens:
                fed.append((i, token))
        active = [i for i, _ in fed]
        if not active:
            break
        logits = model.forward(Batch([slots[i] for i in active], [[t] for _, t in fed]), cache, recorder)
        rows.add_step(recorder, [(*tags[i], lengths[i] + generated[i] - 1, 1) for i in active])


def record_trace(
    model_dir: Path, requests: Sequence[Request], domains: Sequence[str], node_names: Sequence[str],
    *, settings: TraceSettings, extra_meta: dict[str, Any] | None = None,
) -> RoutingTrace:
    """Serve `requests` (in the given order) through Prism's model and return their routing trace."""
    import numpy as np
    import torch

    from services.placement.traces import RoutingTrace, TraceMeta
    from shared.model.model import MoEModel
    from shared.model.moe import LocalExperts
    from shared.model.tokenizer import Tokenizer

    model = MoEModel.from_checkpoint(model_dir)
    recorder = RoutingRecorder(LocalExperts.from_checkpoint(model_dir), model.config.moe_layers)
    tokenizer = Tokenizer.from_dir(model_dir)
    limit = model.config.max_position_embeddings
    rows = _Rows()
    with torch.inference_mode():
        for start in range(0, len(requests), settings.batch):
            chunk = requests[start:start + settings.batch]
            prompts = [tokenizer.encode(r.prompt.text) for r in chunk]
            too_long = [len(p) for p in prompts if len(p) + settings.max_tokens > limit]
            if too_long:
                raise ValueError(f"a prompt of {too_long[0]} tokens plus max_tokens {settings.max_tokens} "
                                 f"exceeds the model's {limit} positions")
            tags = [(r.node, domains.index(r.domain), start + j) for j, r in enumerate(chunk)]
            _serve_batch(model, recorder, prompts, tags, settings=settings, rows=rows)
    cfg = model.config
    meta = TraceMeta(
        model=model_dir.resolve().name, moe_layers=tuple(cfg.moe_layers), num_experts=cfg.num_experts,
        top_k=cfg.top_k, hidden_size=cfg.hidden_size, domains=tuple(domains), nodes=tuple(node_names),
        extra=dict(extra_meta or {}),
    )
    K, L = cfg.top_k, len(cfg.moe_layers)
    return RoutingTrace(
        experts=np.concatenate(rows.experts) if rows.experts else np.zeros((0, L, K), np.int16),
        weights=np.concatenate(rows.weights) if rows.weights else np.zeros((0, L, K), np.float16),
        node=np.asarray(rows.node), domain=np.asarray(rows.domain),
        request=np.asarray(rows.request), position=np.asarray(rows.position), meta=meta,
    )


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("trace", help="run a workload scenario through the model; write its routing trace")
    p.add_argument("--model", type=Path, default=DEMO_MODEL, help="checkpoint directory (default: the demo model)")
    p.add_argument("--scenario", required=True, help="scenario name from workloads/scenarios.json")
    p.add_argument("--out", type=Path, required=True, help="trace file to write (.npz)")
    p.add_argument("--requests", type=int, default=50, help="requests per node (default 50)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="tokens generated per request (default: the scenario's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the request draw and of sampling")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0 = greedy)")
    p.add_argument("--batch", type=int, default=8, help="requests served together (default 8)")
    p.add_argument("--workloads", type=Path, default=None, help="workloads directory (default: the repository's)")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from shared.errors import PrismError
    from shared.workloads import Workloads

    if args.requests < 1 or args.batch < 1 or (args.max_tokens is not None and args.max_tokens < 1):
        print("prism trace: --requests, --batch and --max-tokens must be >= 1", file=sys.stderr)
        return 2
    try:
        workloads = Workloads.load(args.workloads)
        scenario = workloads.scenario(args.scenario)
        requests = workloads.requests(args.scenario, args.requests, args.seed)
        settings = TraceSettings(args.max_tokens or scenario.max_tokens, args.temperature, args.seed, args.batch)
        extra = {"scenario": scenario.name, "seed": args.seed, "requests_per_node": args.requests,
                 "max_tokens": settings.max_tokens, "temperature": args.temperature}
        t0 = time.perf_counter()
        trace = record_trace(args.model, requests, workloads.domains, scenario.node_names,
                             settings=settings, extra_meta=extra)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        written = trace.save(args.out)
    except (PrismError, ValueError, OSError) as exc:  # ModelError and PlacementError are ValueErrors
        print(f"prism trace: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {written}: {trace.num_tokens} tokens of {len(requests)} requests on "
          f"{trace.num_nodes} nodes, {trace.num_layers} MoE layers, in {time.perf_counter() - t0:.1f} s")
    return 0
