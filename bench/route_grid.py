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

The grid: 3 nodes (or 2), memory for 30-90% of the experts per GPU, 500 Mbit/s. `--random N`: N cells
drawn instead (seeded): either shape, 2-5 nodes of 1 or 2 GPUs, memory for 1.05-2.5x the model over
unequal GPUs, 0.1-8 ms round trips, 100-2000 Mbit/s, batch 1-16, domain purity 0.5 or 0.9, the dense
time given to the policies or not (the judge always counts it); with `--speeds`, GPUs of speed 0.5, 1
or 2 (a node's GPUs share its experts by speed; the dense part runs on its first GPU).

    .venv/bin/python bench/route_grid.py [--model deepseek-v2-lite|mixtral-8x7b] [--samples 24]
    .venv/bin/python bench/route_grid.py --random 60 [--seed 0] [--speeds]
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
    link_bps: float = LINK_BPS

    def step_ms(self, plan: Placement) -> float:
        """Mean decode-step time (ms) over homes, each home's step alone (module docstring)."""
        cl = self.cluster
        view = plan.node_view(cl)
        n = view.shape[0]
        rtt = np.broadcast_to(cl.rtt_s, (n, n))
        serve = nearest_holder(view, rtt)
        routes = plan.route_table(n)
        dense = DENSE_S / cl.host_speed[[cl.hosts_of(x)[0] for x in range(n)]]  # on a node's first GPU
        rng = np.random.default_rng(1)
        total = 0.0
        for h in range(n):
            t = np.zeros(self.samples)
            prev = h
            for layer, x in enumerate(routes[h].tolist()):
                if x != prev:
                    t += rtt[prev, x] / 2 + self.batch * self.row_bytes / self.link_bps
                prev = x
                t += dense[x] + self._layer(self._rows(h, layer, rng), serve[x, layer], x, rtt)
            if prev != h:
                t += rtt[prev, h] / 2 + self.batch * self.row_bytes / self.link_bps
            total += float(t.mean())
        return float(1e3 * total / n)

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
        """[samples] max(x's distinct local experts over its GPUs, the slowest remote node's round trip); a
        node's GPUs share its experts by speed."""
        gpus = np.bincount(self.cluster.host_node, weights=self.cluster.host_speed, minlength=rtt.shape[0])
        local = (rows[:, srv == x] > 0).sum(axis=1) * self.expert_s / gpus[x]
        slowest = np.zeros(rows.shape[0])
        for m in set(srv.tolist()) - {x}:
            at = srv == m
            r = rows[:, at].sum(axis=1)
            trip = (rtt[x, m] + 2 * r * self.row_bytes / self.link_bps
                    + (rows[:, at] > 0).sum(axis=1) * self.expert_s / gpus[m])
            slowest = np.maximum(slowest, np.where(r > 0, trip, 0.0))
        return np.asarray(np.maximum(local, slowest))


def cell(model: str, share: float | np.ndarray, gpus: tuple[int, ...], *, rtt_ms: float, batch: int, samples: int,
         mbit: float = 500.0, purity: float = 0.9, dense: bool = False, seed: int = 0,
         speed: np.ndarray | None = None) -> dict[str, float]:
    """ms per step of the best stay-home policy, of `pipeline` and of `route` in one cell; `share`: the
    experts each GPU has memory for (one for all, or one per GPU); `dense`: the policies are told the
    dense part's time (the judge always counts it); `speed`: each GPU's (1.0 without)."""
    shape = PRESETS[model]
    n = len(gpus)
    trace = generate(shape, Traffic.dedicated(n, n, 40, purity=purity, tokens_per_request=(16, 32)), seed=seed)
    freq = trace.counts(n) + 1e-9
    host_node = np.repeat(np.arange(n), gpus)
    slots = np.round(np.broadcast_to(share, host_node.shape) * shape.num_layers * shape.num_experts).astype(int)
    link_bps = mbit * 1e6 / 8
    speed = np.ones(host_node.size) if speed is None else np.asarray(speed, dtype=np.float64)
    cluster = Cluster(host_node, slots, speed, np.array(rtt_ms * 1e-3), np.array(link_bps))
    row_bytes = shape.hidden_size * shape.bytes_per_element
    expert_s = shape.expert_bytes / GPU_BYTES_PER_S + LAUNCH_S
    wl = Workload.uniform(n, batch, top_k=shape.top_k, bytes_per_token=row_bytes, expert_time_s=expert_s,
                          dense_time_s=DENSE_S if dense else 0.0)
    judge = StepModel(cluster, freq, batch, shape.top_k, row_bytes, expert_s, samples, link_bps)

    def timed(policy: str) -> float:
        return judge.step_ms(get_policy(policy)(freq, cluster, workload=wl))

    return {"home": min(timed("eplb"), timed("latency")), "pipeline": timed("pipeline"), "route": timed("route")}


def random_cell(rng: np.random.Generator, index: int, samples: int, speeds: bool = False
                ) -> tuple[str, dict[str, float]]:
    """One cell drawn as the module docstring says: (its description, `cell`'s times)."""
    model = str(rng.choice(["deepseek-v2-lite", "mixtral-8x7b"]))
    gpus = tuple(int(g) for g in rng.choice([1, 1, 1, 2], size=int(rng.integers(2, 6))))
    weights = rng.uniform(0.5, 1.5, size=sum(gpus))
    share = weights / weights.sum() * rng.uniform(1.05, 2.5)
    rtt_ms, mbit = float(rng.choice([0.1, 0.5, 2.0, 8.0])), float(rng.choice([100, 500, 2000]))
    batch, purity, dense = int(rng.choice([1, 4, 8, 16])), float(rng.choice([0.5, 0.9])), bool(rng.integers(0, 2))
    speed = rng.choice([0.5, 1.0, 2.0], size=sum(gpus)) if speeds else np.ones(sum(gpus))
    times = cell(model, share, gpus, rtt_ms=rtt_ms, batch=batch, samples=samples, mbit=mbit, purity=purity,
                 dense=dense, seed=index, speed=speed)
    text = (f"{model} | {'/'.join(map(str, gpus))} | {share.sum():.2f} | {rtt_ms:g} | {mbit:g} | {batch} | "
            f"{purity:g} | {'yes' if dense else 'no'} | {'/'.join(f'{v:g}' for v in speed)}")
    return text, times


def summary(ratios: list[float]) -> str:
    r = np.array(ratios)
    return (f"{r.size} cells: route / min(pipeline, best stay-home) median {np.median(r):.3f}, max {r.max():.3f}; "
            f"above 1.01 in {(r > 1.01).sum()}, below 0.99 in {(r < 0.99).sum()}")


def random_cells(count: int, seed: int, samples: int, speeds: bool = False) -> None:
    print("| # | model | GPUs per node | memory / model | rtt ms | Mbit/s | batch | purity | dense given | GPU speeds "
          "| best stay-home ms | pipeline ms | route ms | route / min |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|")
    rng = np.random.default_rng(seed)
    ratios = []
    for i in range(count):
        text, c = random_cell(rng, i, samples, speeds)
        ratios.append(c["route"] / min(c["home"], c["pipeline"]))
        print(f"| {i} | {text} | {c['home']:.1f} | {c['pipeline']:.1f} | {c['route']:.1f} | {ratios[-1]:.3f} |",
              flush=True)
    print("\n" + summary(ratios))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deepseek-v2-lite", choices=["deepseek-v2-lite", "mixtral-8x7b"])
    parser.add_argument("--samples", type=int, default=24, help="Monte-Carlo steps per home and cell")
    parser.add_argument("--random", type=int, default=0, help="this many random cells instead of the grid")
    parser.add_argument("--seed", type=int, default=0, help="of the random cells")
    parser.add_argument("--speeds", action="store_true", help="random cells with GPUs of speed 0.5, 1 or 2")
    args = parser.parse_args()
    what = (f"{args.random} random cells, seed {args.seed}{', GPU speeds 0.5-2' if args.speeds else ''}"
            if args.random else args.model)
    print(f"# route on held-out shapes, {what}; {platform.machine()} {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; {args.samples} steps per home; a per-step model apart from the project's\n")
    if args.random:
        random_cells(args.random, args.seed, args.samples, args.speeds)
        return
    shares = [0.3, 0.5, 0.7] if args.model == "deepseek-v2-lite" else [0.5, 0.7, 0.9]
    print("| experts per GPU | GPUs per node | rtt ms | batch | best stay-home ms | pipeline ms | route ms "
          "| route / min |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    ratios = []
    layouts = [(1, 1, 2), (1, 1, 1), (2, 1)]
    for share, gpus, rtt_ms, batch in itertools.product(shares, layouts, [0.2, 1.0, 4.0], [1, 8]):
        if share * sum(gpus) < 1.0:
            continue  # the nodes cannot hold the model
        c = cell(args.model, share, gpus, rtt_ms=rtt_ms, batch=batch, samples=args.samples)
        ratios.append(c["route"] / min(c["home"], c["pipeline"]))
        gpu_text = "/".join(map(str, gpus))
        print(f"| {share:.0%} | {gpu_text} | {rtt_ms:g} | {batch} | {c['home']:.1f} | {c['pipeline']:.1f} | "
              f"{c['route']:.1f} | {ratios[-1]:.3f} |", flush=True)
    print("\n" + summary(ratios))


if __name__ == "__main__":
    main()
