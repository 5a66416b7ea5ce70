"""End-to-end placement benchmark: the real stack on a DeepSeek-V2-Lite-shaped model, per policy.

For each placement policy the whole stack runs (`cli.stack.LocalStack`: hub, one leaf per node behind
the link emulator, gatings, expert hosts, placement service, migrator). Round 1 serves every node's
prompts on the static round-robin placement; the placement service then re-plans from round 1's
activation counts, the migrator moves experts (make-before-break), and round 2 serves the same
prompts again. A warm-up round before round 1 keeps first-call costs out of the comparison.
Printed per policy: mean request latency and the share of expert calls answered on the asking node,
before and after, measured in the same run.

Model: DeepSeek-V2-Lite's structure at tiny widths (27 layers, layer 0 dense, 26 MoE layers × 64
routed experts, top-6, 2 shared experts, MLA), random weights; a random router already routes by
token identity, so nodes with different domains use different experts. Topology: the published
testbed's shape, 3 nodes with 1, 1 and 2 hosts, each host with room for 30% of the experts, links of
2 ms one way at 500 Mbit/s.

    .venv/bin/python bench/e2e.py [--policies prism,latency] [--prompts-per-node 4] [--max-tokens 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli.demo import Round, _round, pick_prompts, replan_and_wait  # noqa: E402
from cli.stack import LocalStack, StackOptions  # noqa: E402
from shared.topology import parse_topology  # noqa: E402

V2_LITE_TINY = {
    "num_hidden_layers": 27,
    "first_k_dense_replace": 1,
    "n_routed_experts": 64,
    "num_experts_per_tok": 6,
    "n_shared_experts": 2,
    "topk_method": "greedy",
    "n_group": 1,
    "topk_group": 1,
    "hidden_size": 64,
    "moe_intermediate_size": 32,
}
EXPERT_SLOTS_SHARE = 0.30


def build_model(workdir: Path) -> Path:
    from tests.checkpoints import make_tiny_checkpoint

    return make_tiny_checkpoint("deepseek_v2", workdir / "deepseek-v2-lite-tiny", seed=0, **V2_LITE_TINY)


def topology(expert_bytes: int, num_experts: int) -> Any:
    memory_mb = EXPERT_SLOTS_SHARE * num_experts * expert_bytes / 2**20
    link = {"delay_ms": 2.0, "rate_mbit": 500}
    hosts = {"n0": 1, "n1": 1, "n2": 2}
    nodes = [
        {"name": n, "link": link, "hosts": [{"name": f"{n}-gpu{i}", "memory_mb": memory_mb} for i in range(k)]}
        for n, k in hosts.items()
    ]
    return parse_topology({"dtype": "float32", "nodes": nodes}, "bench/e2e.py")


async def one_policy(model: Path, policy: str, args: argparse.Namespace, run_dir: Path) -> tuple[Round, Round]:
    from cli.client import PrismClient
    from shared.model.checkpoint import load_config
    from shared.model.config import list_moe_layers

    config = load_config(model)
    options = StackOptions(
        topology=topology(config.expert_nbytes("float32"), len(list_moe_layers(config)) * config.num_experts),
        model=model,
        run_dir=run_dir,
        port=0,
        mqtt_port=0,
        http_port=0,
        api_port=0,
        max_context=256,
        expert_timeout_s=10.0,
        activation_interval_s=0.5,
        policy=policy,
        plan_interval_s=3600.0,
        migration_cost_calls=0.0,
        min_window_tokens=0,
        log_level="warning",
    )
    prompts = {
        node: (domain, [t[:48] for t in texts])
        for node, (domain, texts) in pick_prompts(["n0", "n1", "n2"], args.prompts_per_node).items()
    }
    stopped = asyncio.Event()
    async with LocalStack(options) as stack, await PrismClient.connect(stack.hub_url) as client:
        await _round(client, stack, prompts, args.max_tokens, stopped)  # warm-up, not measured
        before = await _round(client, stack, prompts, args.max_tokens, stopped)
        applied, line = await replan_and_wait(client, 120.0)
        if not applied:
            raise SystemExit(f"{policy}: no re-placement: {line}")
        after = await _round(client, stack, prompts, args.max_tokens, stopped)
    return before, after


def mean_latency_ms(r: Round) -> float:
    return 1000 * statistics.mean(lat for run in r.runs for lat in run.latencies_s)


def own_share(r: Round) -> float:
    own = sum(run.own_calls for run in r.runs)
    return own / max(sum(run.all_calls for run in r.runs), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default="prism,latency,eplb")
    parser.add_argument("--prompts-per-node", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="prism-e2e-"))
    model = build_model(work)
    print(f"# Prism end-to-end placement — {platform.machine()}, {os.cpu_count()} cores, CPU, fp32")
    print(
        "DeepSeek-V2-Lite shape at tiny widths (26 MoE layers × 64 experts, top-6, 2 shared); 3 nodes with "
        f"1/1/2 hosts at {EXPERT_SLOTS_SHARE:.0%} of the experts each; 2 ms one way, 500 Mbit/s; "
        f"{args.prompts_per_node} prompts per node (its own domain), {args.max_tokens} tokens each\n"
    )
    print("| policy | static: mean ms | own-host | after re-placement: mean ms | own-host | latency ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for policy in args.policies.split(","):
        before, after = asyncio.run(one_policy(model, policy, args, work / f"run-{policy}"))
        print(
            f"| {policy} | {mean_latency_ms(before):.0f} | {own_share(before):.0%} | "
            f"{mean_latency_ms(after):.0f} | {own_share(after):.0%} | "
            f"{mean_latency_ms(after) / mean_latency_ms(before):.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
