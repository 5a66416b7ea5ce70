"""Two placement policies on the real stack at once, batch-1 requests interleaved: a paired comparison.

`bench/e2e.py` runs one stack per policy, one after the other; on a shared 2-core machine the minutes
between them move ms/token by 10-25% (route / pipeline 0.89-1.26 over runs whose plans were the same).
Here both stacks (bench/e2e.py's testbed: DeepSeek-V2-Lite's structure at tiny widths, 3 nodes with
1/1/2 hosts at 30% of the experts each, 2 ms one way at 500 Mbit/s) run side by side, each warmed up
and re-placed with its policy; then every prompt goes to one stack and then the other (the order
alternating), `--rounds` times. Printed: ms per generated token per policy (the gating's decode time /
(tokens - 1), mean over requests), the paired ratio B / A (geometric mean of the per-request ratios,
with a bootstrap 95% interval) and how the two plans differ (routes, replicas).

    .venv/bin/python bench/e2e_paired.py [--policies pipeline,route] [--rounds 3]
                                         [--prompts-per-node 6] [--max-tokens 12] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.e2e import HOSTS_PER_NODE, _request, build_model, stack_options, topology, warm_up_and_replace  # noqa: E402
from cli.demo import pick_prompts  # noqa: E402
from cli.stack import LocalStack  # noqa: E402


async def ms_per_token(client: Any, node: str, text: str, args: argparse.Namespace) -> float:
    final = await client.infer(node, _request(text, args), timeout_s=300)
    return 1000 * final.timings["decode_s"] / max(len(final.token_ids) - 1, 1)


async def start(stacks: contextlib.AsyncExitStack, model: Path, policy: str, *, prompts: dict[str, list[str]],
                args: argparse.Namespace, work: Path) -> tuple[Any, dict[str, Any]]:
    """A stack with `policy`, warmed up (every node's prompts at once) and re-placed: (client, plan)."""
    from cli.client import PrismClient
    from shared.model.checkpoint import load_config
    from shared.model.config import list_moe_layers

    config = load_config(model)
    topo = topology(config.expert_nbytes("float32"), len(list_moe_layers(config)) * config.num_experts, [2.0] * 3)
    stack = await stacks.enter_async_context(LocalStack(stack_options(topo, model, policy, work / policy)))
    client = await stacks.enter_async_context(await PrismClient.connect(stack.hub_url))
    return client, await warm_up_and_replace(client, policy, prompts, args)


def plans_differ(a: dict[str, Any], b: dict[str, Any]) -> str:
    """How two plans differ: "nothing", or which of routes and hosts (replicas that differ)."""
    def held(plan: dict[str, Any]) -> set[tuple[str, int, int]]:
        return {(h, int(k[0]), int(k[1])) for h, keys in plan["hosts"].items() for k in keys}

    moved = len(held(a) ^ held(b))
    parts = (["routes"] if a.get("routes") != b.get("routes") else []) + ([f"{moved} replicas"] if moved else [])
    return ", ".join(parts) or "nothing"


def ratio_interval(ratios: np.ndarray, seed: int) -> tuple[float, float, float]:
    """(geometric mean, 2.5th and 97.5th percentiles of it over 2000 bootstrap resamples)."""
    logs = np.log(ratios)
    rng = np.random.default_rng(seed)
    means = logs[rng.integers(0, logs.size, size=(2000, logs.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(np.exp(logs.mean())), float(np.exp(lo)), float(np.exp(hi))


async def main_async(args: argparse.Namespace) -> None:
    a, b = args.policies.split(",")
    work = Path(tempfile.mkdtemp(prefix="prism-e2e-paired-"))
    model = build_model(work)
    picked = pick_prompts(list(HOSTS_PER_NODE), args.prompts_per_node)
    prompts = {node: [t[:48] for t in texts] for node, (_, texts) in picked.items()}
    async with contextlib.AsyncExitStack() as stacks:
        started = time.perf_counter()
        (client_a, plan_a), (client_b, plan_b) = [
            await start(stacks, model, p, prompts=prompts, args=args, work=work) for p in (a, b)]
        print(f"# both stacks up and re-placed in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        times: dict[str, list[float]] = {a: [], b: []}
        turn = 0
        for _ in range(args.rounds):
            for node, texts in prompts.items():
                for text in texts:
                    order = [(a, client_a), (b, client_b)][:: 1 if turn % 2 == 0 else -1]
                    turn += 1
                    for policy, client in order:
                        times[policy].append(await ms_per_token(client, node, text, args))
    ratios = np.array(times[b]) / np.array(times[a])
    mean, lo, hi = ratio_interval(ratios, args.seed)
    print(f"# e2e paired on {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{args.rounds} rounds x {sum(map(len, prompts.values()))} prompts, {args.max_tokens} tokens, greedy")
    print(f"\n| policy | ms/token, batch 1 (mean over {ratios.size} requests) |\n|---|---:|")
    for policy in (a, b):
        print(f"| {policy} | {np.mean(times[policy]):.1f} |")
    print(f"\n{b} / {a}, paired: {mean:.3f} (95% interval {lo:.3f}-{hi:.3f}); "
          f"the plans differ in: {plans_differ(plan_a, plan_b)}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--policies", default="pipeline,route", help="two, comma separated: A,B")
    parser.add_argument("--rounds", type=int, default=3, help="passes over every node's prompts")
    parser.add_argument("--prompts-per-node", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0, help="of the bootstrap")
    args = parser.parse_args()
    if len(args.policies.split(",")) != 2 or args.rounds < 1 or args.max_tokens < 2:
        parser.error("need two policies, --rounds >= 1 and --max-tokens >= 2")
    return args


def main() -> None:
    from shared.runtime import run

    args = parse_args()
    run(lambda: main_async(args))


if __name__ == "__main__":
    main()
