"""`prism place`: compute an expert placement offline from activation counts.

    prism place --counts FILE.npy (--slots 8,8,16 | --topology FILE [--model DIR]) --policy NAME [--json]
                [--plot FILE.png]

FILE.npy holds f with shape [nodes, layers, experts]: how often each node's tokens chose each routed
expert (any non-negative real numbers). `--slots` gives one host per node with that many expert slots
(links: `--rtt-ms`, `--rate-mbit`, the same for every pair); `--topology` reads nodes, hosts (slots or
memory, speed) and links from a TOML or JSON file, in the format of `services/placement/topology.py`
or that of `prism up` (the files under topologies/). A `prism up` file's hosts get
floor(memory_mb / one expert) slots, the expert being one of `--model` (default: the demo model) at
the file's dtype; only that size is taken from the model, so FILE.npy's layers and experts may differ.
`--batch`, `--top-k`, `--bytes-per-token`, `--expert-time-us` describe the workload for the `latency`
and `route` policies (co-activation sets are drawn ∝ f, independently, with `--top-k` experts per
token); `--dense-time-us` and `--step-rate` (steps per second per home) let `route` count the dense part
a node runs for other homes and rehearse that load in the simulator (services/placement/rehearsal.py;
off by default), with requests of `--tokens-per-request` tokens (default: the rehearsal's 32);
`--kv-slots-per-layer` charges a node that runs a layer for another home that many expert slots for that
home's KV (`pipeline`, `route`; default 0).

Output: a table of calls, remote calls and slot use per node, and the proxy objective Σ f·remote;
with `--json`, one JSON object: `policy`, `objective` (the proxy), `remote_share`, `nodes` (per node:
`slots`, `used`, `calls`, `remote`), `placement` ([node, layer, expert] triples, nodes by index),
`host_placement` ([host, layer, expert]), `solve_s` and `routes`: {"<home node index>": [executing
node index per layer of FILE.npy]}, every home listed (stay-home, [h] * layers, for every policy but
`pipeline` and `route`). `--plot` writes a heatmap per node of the frequency shares with the held
experts marked.

Errors (unreadable file, wrong shape, NaN, negative counts, fewer slots than experts, unknown policy)
are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli import DEMO_MODEL

if TYPE_CHECKING:  # numpy and the placement package load in the handler, not at CLI start
    import numpy as np

EXIT_BAD_INPUT = 2


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("place", help="compute an expert placement from activation counts")
    p.add_argument("--counts", required=True, help="[nodes, layers, experts] activation counts (.npy)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--slots", help="expert slots per node, comma separated, e.g. 8,8,16")
    where.add_argument("--topology", help="topology file (TOML, or JSON by suffix): the `prism place` format "
                       "(services/placement/topology.py) or a `prism up` one (see topologies/)")
    p.add_argument("--model", type=Path, default=DEMO_MODEL,
                   help="checkpoint directory whose expert size (at the file's dtype) gives the slots of a "
                   "`prism up` topology's hosts; only the size is used, --counts may have other "
                   "layers/experts (default: the demo model)")
    p.add_argument("--policy", required=True,
                   help="uniform, redundance, eplb, prism, optimal, latency, pipeline or route")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--plot", help="write a heatmap of the placement against the frequencies (PNG)")
    p.add_argument("--rtt-ms", type=float, default=4.0, help="round trip between nodes with --slots (ms)")
    p.add_argument("--rate-mbit", type=float, default=500.0, help="link bandwidth with --slots (Mbit/s)")
    p.add_argument("--batch", type=int, default=1, help="tokens per decode step per node (latency policy)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (latency policy)")
    p.add_argument("--bytes-per-token", type=float, default=4096.0, help="hidden × dtype bytes (latency)")
    p.add_argument("--expert-time-us", type=float, default=40.0, help="one active expert per step (latency)")
    p.add_argument("--dense-time-us", type=float, default=0.0,
                   help="the dense part of one layer of a step (route: the executing node computes it)")
    p.add_argument("--step-rate", type=float, default=0.0,
                   help="decode steps per second each home runs on average (route: its layouts rehearsed on "
                   "that load in the simulator; 0: not)")
    p.add_argument("--tokens-per-request", type=float, default=None,
                   help="decode steps a request takes (route's rehearsal; default 32)")
    p.add_argument("--kv-slots-per-layer", type=float, default=0.0,
                   help="expert slots a home's KV takes per layer another node runs for it (pipeline, route)")
    p.set_defaults(func=handler)


def _fail(message: str) -> int:
    print(f"prism place: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _load_counts(path: str) -> np.ndarray:
    import numpy as np

    from services.placement.errors import InvalidInputError

    try:
        counts = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise InvalidInputError(f"cannot read counts from {path}: {e}") from e
    if not isinstance(counts, np.ndarray):
        raise InvalidInputError(f"{path} holds several arrays (.npz); give one .npy array [nodes, layers, experts]")
    return counts


def _cluster(args: argparse.Namespace) -> Any:
    from services.placement.errors import InvalidInputError
    from services.placement.topology import load_topology
    from services.placement.types import Cluster

    if args.topology:
        return load_topology(args.topology, args.model)[0]
    try:
        slots = [int(s) for s in args.slots.split(",")]
    except ValueError:
        raise InvalidInputError(f"--slots must be comma-separated integers, got {args.slots!r}") from None
    if any(s < 0 for s in slots):
        raise InvalidInputError(f"--slots must be >= 0, got {args.slots}")
    if not (args.rtt_ms >= 0 and args.rate_mbit > 0):
        raise InvalidInputError("--rtt-ms must be >= 0 and --rate-mbit > 0")
    return Cluster.from_slots(slots, rtt_s=args.rtt_ms / 1e3, bandwidth_Bps=args.rate_mbit * 1e6 / 8)


def summary(freq: np.ndarray, placement: Any, cluster: Any) -> dict[str, Any]:
    """Per-node calls, remote calls, slots and use, plus the proxy objective."""
    import numpy as np

    view = placement.node_view(cluster)
    calls = freq.sum(axis=(1, 2))
    remote = np.where(view, 0.0, freq).sum(axis=(1, 2))
    used = np.bincount(cluster.host_node, weights=placement.hosts.sum(axis=(1, 2)), minlength=cluster.num_nodes)
    nodes = [
        {"node": n, "slots": int(cluster.node_slots()[n]), "used": int(used[n]), "calls": float(calls[n]),
         "remote": float(remote[n])}
        for n in range(cluster.num_nodes)
    ]
    total = float(calls.sum())
    return {"objective": float(remote.sum()), "remote_share": float(remote.sum()) / total if total else 0.0,
            "nodes": nodes}


def _print_table(name: str, info: dict[str, Any], solve_s: float) -> None:
    print(f"policy {name}: proxy objective {info['objective']:.6g} remote calls "
          f"({100 * info['remote_share']:.1f}% of all), solved in {solve_s:.3f} s")
    print(f"{'node':>4} {'slots':>6} {'used':>6} {'calls':>12} {'remote':>12} {'remote %':>9}")
    for row in info["nodes"]:
        share = 100 * row["remote"] / row["calls"] if row["calls"] else 0.0
        print(f"{row['node']:>4} {row['slots']:>6} {row['used']:>6} {row['calls']:>12.6g} "
              f"{row['remote']:>12.6g} {share:>9.1f}")


def _print_routes(routes: np.ndarray | None) -> None:
    from services.placement.routes import hops, segments

    if routes is None:  # stay-home: the table says it all
        return
    for h, row in enumerate(routes):
        parts = ", ".join(f"layers {s.start}-{s.end - 1} on node {s.node}" for s in segments(row))
        print(f"home {h}: {parts} ({hops(row, h)} hops per step)")


def handler(args: argparse.Namespace) -> int:
    import numpy as np

    from services.placement.errors import PlacementError
    from services.placement.policies import get_policy
    from services.placement.types import Workload, check_inputs

    if args.plot and not _can_plot():
        return _fail("--plot needs matplotlib, from the `plot` extra: ./run-tests installs it, "
                     "or .venv/bin/pip install -e '.[plot]'")
    try:
        policy = get_policy(args.policy)
        cluster = _cluster(args)
        freq = check_inputs(_load_counts(args.counts), cluster)
        workload = Workload.uniform(cluster.num_nodes, args.batch, top_k=args.top_k,
                                    bytes_per_token=args.bytes_per_token,
                                    expert_time_s=args.expert_time_us * 1e-6,
                                    kv_slots_per_layer=args.kv_slots_per_layer,
                                    dense_time_s=args.dense_time_us * 1e-6,
                                    step_rate=np.full(cluster.num_nodes, args.step_rate) if args.step_rate else None,
                                    tokens_per_request=args.tokens_per_request)
        start = time.perf_counter()
        placement = policy(freq, cluster, workload=workload)
        solve_s = time.perf_counter() - start
    except PlacementError as e:
        return _fail(str(e))
    info = summary(freq, placement, cluster)
    if args.json:
        out = {"policy": args.policy, **info, "solve_s": solve_s,
               "placement": [list(t) for t in placement.to_triples(cluster)],
               "host_placement": np.argwhere(placement.hosts).tolist()}
        table = placement.route_table(cluster.num_nodes)  # stay-home rows for the stay-home policies
        out["routes"] = {str(h): [int(x) for x in row] for h, row in enumerate(table)}
        print(json.dumps(out))
    else:
        _print_table(args.policy, info, solve_s)
        _print_routes(placement.routes)
    if args.plot:
        try:
            plot(freq, placement.node_view(cluster), args.plot, title=f"policy {args.policy}")
        except OSError as e:
            return _fail(f"cannot write {args.plot}: {e.strerror}")
        except ValueError as e:  # matplotlib: an image format it does not know from the suffix
            return _fail(f"cannot write {args.plot}: {e}")
    return 0


def _can_plot() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot(freq: np.ndarray, view: np.ndarray, path: str, title: str) -> None:
    """One panel per node: layer × expert shares of that node's calls, held experts as white dots."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_nodes, n_layers, n_experts = freq.shape
    tot = freq.sum(axis=2, keepdims=True)
    share = np.divide(freq, tot, out=np.zeros_like(freq), where=tot > 0)
    fig, axes = plt.subplots(1, n_nodes, figsize=(min(4 + 3 * n_nodes, 40), 4), squeeze=False)
    for n, ax in enumerate(axes[0]):
        im = ax.imshow(share[n], aspect="auto", cmap="viridis", interpolation="nearest")
        ls, es = np.nonzero(view[n])
        ax.scatter(es, ls, s=max(1.0, 400.0 / max(n_experts, n_layers)), c="white", marker="o", linewidths=0)
        ax.set_title(f"node {n}: {100 * np.where(view[n], 0, freq[n]).sum() / max(freq[n].sum(), 1e-12):.0f}% remote")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.046, label="share of the node's calls in the layer")
    fig.suptitle(f"{title}: activation share (colour) and held experts (dots)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
