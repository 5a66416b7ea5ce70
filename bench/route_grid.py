"""`route` against its baselines on held-out shapes, judged by a per-step model written apart from the project's.

The policies see what `prism place` gives them (`--slots`, `--rtt-ms`, `--rate-mbit`, `--batch`,
`--top-k`, `--bytes-per-token`, `--expert-time-us`; no dense part, no step rates) and activation counts
from the calibrated synthetic routing (`services/placement/synthetic.py`, one domain per node). Their
plans are then timed by a Monte-Carlo model that shares no code with `route_model` or the simulator:
each home's decode step alone, tokens drawing top-k distinct experts ∝ its counts (Gumbel top-k), per
layer a dense part, then max(the executing node's distinct local experts over its GPUs, the slowest
remote node's round trip + the rows' bytes both ways + its distinct experts over its GPUs), and a
one-way hop (half the round trip + the batch's bytes) wherever the executing node changes, home first
and last. Printed per cell: ms per step of the best stay-home policy (`eplb`, `latency`), of `pipeline`
and of `route`, and route / min(pipeline, best stay-home).

    .venv/bin/python bench/route_grid.py [--model deepseek-v2-lite|mixtral-8x7b] [--samples 24]
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.placement import Cluster, Placement, Workload
from services.placement.policies import get_policy
from services.placement.synthetic import PRESETS, Traffic, generate

DENSE_S = 150e-6  # the dense part of a layer (attention, router), the same for every plan
LINK_BPS = 500e6 / 8
GPU_BYTES_PER_S, LAUNCH_S = 600e9, 10e-6  # an expert call reads its weights once (scenarios.py's edge GPU)


def nearest_holder(view: np.ndarray, rtt: np.ndarray) -> np.ndarray:
    """[N_x, L, E]: the node that serves expert e of layer l for a layer executed on x (x itself if it
    holds it, else the holder with the lowest round trip from x, then the lowest index)."""
    n = view.shape[0]
    order = np.argsort(rtt + 1e-9 * np.arange(n)[None, :], axis=1, kind="stable")  # [N_x, N] nearest first
    out = np.full((n, *view.shape[1:]), -1)
    for x in range(n):
        for m in order[x][::-1]:  # the nearest holder written last wins
            out[x][view[m]] = m
    return out


@dataclass(frozen=True)
class StepModel:
    """The judge's view of one cell: the cluster, each home's counts and the workload."""

    cluster: Cluster
    freq: np.ndarray  # [N, L, E]
    batch: int
    top_k: int
    row_bytes: float
    expert_s: float
    samples: int

    def step_ms(self, plan: Placement) -> float:
        """Mean decode-step time (ms) over homes, each home's step alone (module docstring)."""
        cl = self.cluster
        view = plan.node_view(cl)
        n = view.shape[0]
        rtt = np.broadcast_to(cl.rtt_s, (n, n))
        serve = nearest_holder(view, rtt)
        routes = plan.route_table(n)
        rng = np.random.default_rng(1)
        total = 0.0
        for h in range(n):
            t = np.zeros(self.samples)
            prev = h
            for layer, x in enumerate(routes[h].tolist()):
                if x != prev:
                    t += rtt[prev, x] / 2 + self.batch * self.row_bytes / LINK_BPS
                prev = x
                t += DENSE_S + self._layer(self._rows(h, layer, rng), serve[x, layer], x, rtt)
            if prev != h:
                t += rtt[prev, h] / 2 + self.batch * self.row_bytes / LINK_BPS
            total += float(t.mean())
        return 1e3 * total / n

    def _rows(self, home: int, layer: int, rng: np.random.Generator) -> np.ndarray:
        """[samples, E]: how many of a step's tokens chose each expert (top-k distinct ∝ the counts)."""
        p = self.freq[home, layer]
        n_experts = p.size
        keys = np.log(p / p.sum() + 1e-30) + rng.gumbel(size=(self.samples, self.batch, n_experts))
        chosen = np.argpartition(-keys, self.top_k - 1, axis=-1)[..., : self.top_k].reshape(self.samples, -1)
        rows = np.zeros((self.samples, n_experts))
        np.add.at(rows, (np.arange(self.samples)[:, None], chosen), 1.0)
        return rows

    def _layer(self, rows: np.ndarray, srv: np.ndarray, x: int, rtt: np.ndarray) -> np.ndarray:
        """[samples] max(x's distinct local experts over its GPUs, the slowest remote node's round trip)."""
        gpus = np.bincount(self.cluster.host_node, minlength=rtt.shape[0])
        local = (rows[:, srv == x] > 0).sum(axis=1) * self.expert_s / gpus[x]
        slowest = np.zeros(rows.shape[0])
        for m in set(srv.tolist()) - {x}:
            at = srv == m
            r = rows[:, at].sum(axis=1)
            trip = (rtt[x, m] + 2 * r * self.row_bytes / LINK_BPS
                    + (rows[:, at] > 0).sum(axis=1) * self.expert_s / gpus[m])
            slowest = np.maximum(slowest, np.where(r > 0, trip, 0.0))
        return np.asarray(np.maximum(local, slowest))


def cell(model: str, share: float, gpus: tuple[int, ...], *, rtt_ms: float, batch: int, samples: int
         ) -> dict[str, float]:
    """ms per step of the best stay-home policy, of `pipeline` and of `route` in one cell."""
    shape = PRESETS[model]
    n = len(gpus)
    trace = generate(shape, Traffic.dedicated(n, n, 40, purity=0.9, tokens_per_request=(16, 32)), seed=0)
    freq = trace.counts(n) + 1e-9
    host_node = np.repeat(np.arange(n), gpus)
    slots = np.full(host_node.size, round(share * shape.num_layers * shape.num_experts))
    cluster = Cluster(host_node, slots, np.ones(host_node.size), np.array(rtt_ms * 1e-3), np.array(LINK_BPS))
    row_bytes = shape.hidden_size * shape.bytes_per_element
    expert_s = shape.expert_bytes / GPU_BYTES_PER_S + LAUNCH_S
    wl = Workload.uniform(n, batch, top_k=shape.top_k, bytes_per_token=row_bytes, expert_time_s=expert_s)
    judge = StepModel(cluster, freq, batch, shape.top_k, row_bytes, expert_s, samples)

    def timed(policy: str) -> float:
        return judge.step_ms(get_policy(policy)(freq, cluster, workload=wl))

    return {"home": min(timed("eplb"), timed("latency")), "pipeline": timed("pipeline"), "route": timed("route")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deepseek-v2-lite", choices=["deepseek-v2-lite", "mixtral-8x7b"])
    parser.add_argument("--samples", type=int, default=24, help="Monte-Carlo steps per home and cell")
    args = parser.parse_args()
    shares = [0.3, 0.5, 0.7] if args.model == "deepseek-v2-lite" else [0.5, 0.7, 0.9]
    print(f"# route on held-out shapes, {args.model}; {platform.machine()} {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; {args.samples} steps per home; a per-step model apart from the project's\n")
    print("| experts per GPU | GPUs per node | rtt ms | batch | best stay-home ms | pipeline ms | route ms "
          "| route / min |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    ratios = []
    layouts = [(1, 1, 2), (1, 1, 1), (2, 1)]
    for share, gpus, rtt_ms, batch in itertools.product(shares, layouts, [0.2, 1.0, 4.0], [1, 8]):
        if share * sum(gpus) < 1.0:
            continue  # the nodes cannot hold the model
        c = cell(args.model, share, gpus, rtt_ms=rtt_ms, batch=batch, samples=args.samples)
        ratio = c["route"] / min(c["home"], c["pipeline"])
        ratios.append(ratio)
        gpu_text = "/".join(map(str, gpus))
        print(f"| {share:.0%} | {gpu_text} | {rtt_ms:g} | {batch} | {c['home']:.1f} | {c['pipeline']:.1f} | "
              f"{c['route']:.1f} | {ratio:.3f} |", flush=True)
    r = np.array(ratios)
    print(f"\n{r.size} cells: route / min(pipeline, best stay-home) median {np.median(r):.3f}, max {r.max():.3f}; "
          f"above 1.01 in {(r > 1.01).sum()}, below 0.99 in {(r < 0.99).sum()}")


if __name__ == "__main__":
    main()
