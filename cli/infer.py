"""`prism infer`: send one request to a node and stream the answer to the terminal.

    prism infer [--node NODE] [--max-tokens N] [--temperature T] [--top-p P] [--seed S]
                [--input-ids 1,2,3] [--json] [--url nats://...] [--timeout S] [PROMPT]

Without --node, the first gating to answer `$SRV.PING.prism-gating` is used. Tokens are printed as
they arrive (a usage line follows on stderr); --json prints the final reply as one JSON object.
An error reply prints `error <code>: <message>` on stderr and exits 1; no answer in time exits 1
with `error timeout: ...`; bad flags exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from cli.args import EXIT_ERROR, EXIT_USAGE, add_connection_args, positive


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("infer", help="send a prompt to a node and stream the answer")
    p.add_argument("prompt", nargs="?", help="text to continue (or use --input-ids)")
    p.add_argument("--node", help="node to ask (default: the first gating that answers a ping)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    p.add_argument("--seed", type=int, help="makes sampling reproducible")
    p.add_argument("--input-ids", help="comma-separated token ids instead of a prompt, e.g. 1,2,3")
    p.add_argument("--json", action="store_true", help="print the final reply as JSON (no streaming)")
    add_connection_args(p)
    p.add_argument("--timeout", type=positive, default=60.0,
                   help="seconds to wait for the reply / each token (default 60)")
    p.set_defaults(func=handler)


def build_request(args: argparse.Namespace) -> dict[str, Any]:
    """The JSON request; raises ValueError for flags that cannot form one (checked again by the node)."""
    if (args.prompt is None) == (args.input_ids is None):
        raise ValueError("give exactly one of PROMPT or --input-ids")
    request: dict[str, Any] = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p}
    if args.seed is not None:
        request["seed"] = args.seed
    if args.input_ids is not None:
        try:
            request["input_ids"] = [int(x) for x in args.input_ids.split(",")]
        except ValueError:
            raise ValueError(f"--input-ids must be comma-separated integers, got {args.input_ids!r}") from None
    else:
        request["prompt"] = args.prompt
    return request


def handler(args: argparse.Namespace) -> int:
    from shared.runtime import run

    try:
        request = build_request(args)
    except ValueError as exc:
        print(f"prism infer: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return run(lambda: infer(args, request))


async def infer(args: argparse.Namespace, request: dict[str, Any]) -> int:
    from cli.client import Final, InferError, PrismClient

    try:
        async with await PrismClient.connect(args.url, user=args.user, password=args.password) as client:
            node = args.node or await _first_node(client)
            if args.json:
                final = await client.infer(node, request, timeout_s=args.timeout)
                print(json.dumps(final.raw))
                return 0
            async for part in client.stream(node, request, idle_timeout_s=args.timeout):
                if isinstance(part, Final):
                    _print_usage(node, part)
                else:
                    print(part.text, end="", flush=True)
    except InferError as exc:
        print(f"error {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    return 0


async def _first_node(client: Any) -> str:
    from cli.client import InferError

    nodes = await client.nodes()
    if not nodes:
        raise InferError("no_responders", "no gating answered a ping; is `prism up` running? (or pass --node)")
    return str(nodes[0])


def _print_usage(node: str, final: Any) -> None:
    usage, timings = final.usage, final.timings
    print(flush=True)
    print(
        f"[{node}: {usage.get('prompt_tokens', '?')} prompt + {usage.get('completion_tokens', '?')} generated tokens, "
        f"finish {final.finish_reason}, {final.latency_s * 1000:.0f} ms "
        f"(expert wait {timings.get('expert_wait_s', 0) * 1000:.0f} ms)]",
        file=sys.stderr,
    )
