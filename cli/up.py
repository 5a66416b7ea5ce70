"""`prism up`: run the whole system on this machine until Ctrl-C or SIGTERM.

    prism up [--topology FILE | --nodes N --hosts-per-node H [--memory-mb M] [--delay-ms D] [--rate-mbit R]
              [--host-processes]]
             [--model DIR] [--port P] [--mqtt-port Q] [--monitor-port R] [--api-port A] [--run-dir DIR]

Starts the hub, one leaf per node (behind a link emulator where the link has a delay or rate),
a gating per node, the expert hosts and the OpenAI-compatible HTTP API (see cli/stack.py), waits until
every node and the API answer, prints how to send a request (`prism infer` and `curl`), restarts a child
that dies while serving, and on Ctrl-C / SIGTERM stops every child (SIGKILL after a bound).
`--http-port` is the old name of `--monitor-port` (the hub's monitoring port), kept as an alias.
Errors (taken port, invalid model, topology that cannot hold the model, a child that fails to
start) are one line on stderr, exit code 1, nothing left running. Exit code 0 after a clean stop.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli import DEMO_MODEL
from cli.args import at_least, non_negative, port_number, positive

if TYPE_CHECKING:  # imported in the handlers: the CLI starts without nats and torch
    from cli.stack import LocalStack
    from cli.stack_plan import StackOptions

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


POLICY_NAMES = (  # services.placement's PolicyName
    "uniform", "redundance", "eplb", "prism", "optimal", "latency", "pipeline", "route",
)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("up", help="run hub, leaves, gatings and expert hosts on this machine")
    add_stack_arguments(p)
    p.set_defaults(func=handler)


def add_stack_arguments(
    p: argparse.ArgumentParser, *, nodes: int = 2, hosts: int = 2, delay_ms: float = 0.0, demo: bool = False
) -> None:
    """Flags shared by `prism up` and `prism demo` (which picks free ports and re-plans when it asks)."""
    where = p.add_mutually_exclusive_group()
    file_default = " (default topologies/demo.toml)" if demo else ""
    where.add_argument("--topology", type=Path, help=f"topology file (.toml or .json), see topologies/{file_default}")
    where.add_argument("--nodes", type=int, help=f"number of nodes without a topology file (default {nodes})")
    shape = p.add_argument_group("nodes without a topology file (the file sets these)")
    shape.add_argument("--hosts-per-node", type=int, help=f"expert hosts per node (default {hosts})")
    shape.add_argument("--memory-mb", type=positive, help="expert memory per host, MiB (default 4096)")
    shape.add_argument("--delay-ms", type=non_negative, help=f"one-way hub delay, ms (default {delay_ms:g})")
    shape.add_argument("--rate-mbit", type=positive, help="link rate per direction, Mbit/s (default unlimited)")
    shape.add_argument("--host-processes", action="store_true", default=None,
                       help="run each expert host as a process of its own (default: in its node's gating)")
    p.add_argument("--model", type=Path, default=DEMO_MODEL, help="checkpoint directory (default: the demo model)")
    port, mqtt, http, api = (0, 0, 0, 0) if demo else (4222, 1883, 8222, 8000)
    p.add_argument("--port", type=port_number, default=port, help=f"hub client port, 0 = a free one (default {port})")
    p.add_argument("--mqtt-port", type=port_number, default=mqtt, help=f"hub MQTT port, 0 = off (default {mqtt})")
    p.add_argument("--monitor-port", "--http-port", dest="http_port", type=port_number, default=http,
                   help=f"hub monitoring port (nats-server's HTTP), 0 = off (default {http}; old name --http-port)")
    p.add_argument("--api-port", type=port_number, default=api,
                   help=f"OpenAI-compatible HTTP API on 127.0.0.1, 0 = off (default {api})")
    p.add_argument("--run-dir", type=Path, help="logs and configs (default var/run-<timestamp>)")
    p.add_argument("--ready-timeout", type=positive, default=180.0, help="seconds to wait for every node (default 180)")
    p.add_argument("--policy", default="prism", choices=POLICY_NAMES, help="placement policy (default prism)")
    if not demo:  # the demo re-plans once, when round 1 is done
        p.add_argument("--plan-interval", type=at_least(0.1), default=10.0,
                       help="seconds between re-plans, at least 0.1 (default 10)")
    p.set_defaults(default_nodes=nodes, default_hosts=hosts, default_delay_ms=delay_ms)


SHAPE_FLAGS = {"hosts_per_node": "--hosts-per-node", "memory_mb": "--memory-mb", "delay_ms": "--delay-ms",
               "rate_mbit": "--rate-mbit", "host_processes": "--host-processes"}


def build_options(args: argparse.Namespace, **overrides: Any) -> StackOptions:
    """StackOptions from the parsed flags; raises TopologyError on a bad topology, or on flags that
    describe nodes next to a topology file (which describes them itself)."""
    from cli.stack_plan import StackOptions
    from shared.topology import TopologyError, load_topology, simple_topology

    if args.topology is not None:
        given = [flag for name, flag in SHAPE_FLAGS.items() if getattr(args, name) is not None]
        if given:
            raise TopologyError(f"{', '.join(given)}: the topology file {args.topology} sets the nodes; "
                                "use these flags with --nodes instead")
        topology = load_topology(args.topology)
    else:
        topology = simple_topology(
            args.default_nodes if args.nodes is None else args.nodes,
            args.default_hosts if args.hosts_per_node is None else args.hosts_per_node,
            memory_mb=4096.0 if args.memory_mb is None else args.memory_mb,
            delay_ms=args.default_delay_ms if args.delay_ms is None else args.delay_ms,
            rate_mbit=args.rate_mbit,
            embedded=not args.host_processes,
        )
    # Absolute from here on: children start in the repository, not in the caller's directory.
    run_dir = (args.run_dir or Path("var") / time.strftime("run-%Y%m%d-%H%M%S")).absolute()
    settings: dict[str, Any] = {"policy": args.policy, **gating_settings_from_env()}
    if getattr(args, "plan_interval", None) is not None:
        settings["plan_interval_s"] = args.plan_interval
    return StackOptions(
        topology=topology,
        model=args.model.absolute(),
        run_dir=run_dir,
        port=args.port,
        mqtt_port=args.mqtt_port,
        http_port=args.http_port,
        api_port=args.api_port,
        ready_timeout_s=args.ready_timeout,
        **{**settings, **overrides},
    )


# Gating settings that the launcher also needs (max_payload is sized for the context): read here, so
# that `PRISM_GATING_MAX_CONTEXT=2048 prism up` works as it would for the service alone.
GATING_ENV = ("max_context", "expert_timeout_s", "activation_interval_s")


def gating_settings_from_env() -> dict[str, Any]:
    """StackOptions fields from the PRISM_GATING_* variables that are set, checked against the gating's
    own bounds before anything starts; TopologyError names a bad one."""
    from typing import Annotated

    from pydantic import ConfigDict, TypeAdapter, ValidationError

    from services.gating.settings import GatingSettings
    from shared.topology import TopologyError

    found: dict[str, Any] = {}
    for name in GATING_ENV:
        var = f"PRISM_GATING_{name.upper()}"
        if var not in os.environ:
            continue
        field = GatingSettings.model_fields[name]
        kind = Annotated[field.annotation, *field.metadata]  # type: ignore[name-defined]
        try:
            found[name] = TypeAdapter(kind, config=ConfigDict(allow_inf_nan=False)).validate_python(os.environ[var])
        except ValidationError as exc:
            raise TopologyError(f"{var}={os.environ[var]!r}: {exc.errors()[0]['msg']}") from None
    return found


def handler(args: argparse.Namespace) -> int:
    from shared.topology import TopologyError

    try:
        options = build_options(args)
    except TopologyError as exc:
        return fail(str(exc))
    return run_until_signal(options, serve_forever)


async def serve_forever(stack: LocalStack, stopped: asyncio.Event) -> int:
    print(describe(stack), flush=True)
    supervisor = asyncio.create_task(stack.supervise(_warn))
    await stopped.wait()
    supervisor.cancel()
    await asyncio.gather(supervisor, return_exceptions=True)  # no restart once stopping starts
    print("prism up: stopping", file=sys.stderr, flush=True)
    return 0


def _warn(message: str) -> None:
    print(f"prism up: warning: {message}", file=sys.stderr, flush=True)


def run_until_signal(options: StackOptions, body: Callable[[LocalStack, asyncio.Event], Awaitable[int]]) -> int:
    """Start the stack, run `body(stack, stopped)` and stop the stack; SIGINT/SIGTERM end it early."""
    from cli.stack import LocalStack, StackError
    from shared.runtime import run

    async def main() -> int:
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopped.set)
        try:
            return await start_run_stop(stopped)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    async def start_run_stop(stopped: asyncio.Event) -> int:
        stack = LocalStack(options)
        try:
            stack.prepare()  # a bad model or a taken port: say so before "starting"
        except StackError as exc:
            return fail(str(exc))
        print(f"prism: starting; logs in {options.run_dir}/", file=sys.stderr, flush=True)
        starting = asyncio.create_task(stack.start())
        interrupted = asyncio.create_task(stopped.wait())
        await asyncio.wait({starting, interrupted}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()  # start() stops what it started
            await asyncio.gather(starting, return_exceptions=True)
            return fail("interrupted while starting; everything is stopped", EXIT_INTERRUPTED)
        interrupted.cancel()
        try:
            starting.result()
        except StackError as exc:
            return fail(str(exc))
        for var in sorted(stack.ignored_env):
            print(f"prism: warning: {var} from the environment is not used: prism up sets it", file=sys.stderr)
        try:
            return await body(stack, stopped)
        finally:
            await stack.stop()

    return run(main)


def fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"prism: error: {message}", file=sys.stderr, flush=True)
    return code


def curl_line(stack: LocalStack) -> str:
    """A `curl` that asks the HTTP API (with the key's header when PRISM_API_KEY is set)."""
    auth = ' -H "Authorization: Bearer $PRISM_API_KEY"' if os.environ.get("PRISM_API_KEY") else ""
    model = stack.plan.model_name if stack.plan else ""
    body = f'{{"model": "{model}", "prompt": "Hello", "max_tokens": 16}}'
    return f"curl {stack.api_url}/v1/completions{auth} -H 'Content-Type: application/json' -d '{body}'"


def describe(stack: LocalStack) -> str:
    """What is running and how to send a request."""
    opts = stack.options
    first = opts.topology.nodes[0].name
    count = len(opts.topology.nodes)
    lines = [f"prism is up: {count} node{'s' if count > 1 else ''}, model {opts.model}"]
    extras = [f"monitoring http://127.0.0.1:{opts.http_port}" if opts.http_port else "",
              f"MQTT 127.0.0.1:{opts.mqtt_port}" if opts.mqtt_port else ""]
    lines.append(f"  hub    {stack.hub_url}  {'  '.join(x for x in extras if x)}".rstrip())
    if opts.api_port:
        lines.append(f"  api    {stack.api_url}/v1  (OpenAI-compatible HTTP)")
    for node in opts.topology.nodes:
        link = node.link
        shape = "ideal link" if link.shape().is_ideal else (
            f"link {link.delay_ms:g} ms one way, " + (f"{link.rate_mbit:g} Mbit/s" if link.rate_mbit else "unlimited")
        )
        hosts = ", ".join(f"{h.name} ({len(stack.placement[h.name])} experts)" for h in node.hosts)
        lines.append(f"  node   {node.name}: leaf {stack.leaf_urls[node.name]}, {shape}; hosts {hosts}")
    lines += [
        "send a request:",
        f'  prism infer --url {stack.hub_url} --node {first} "Hello"',
        f"  raw NATS: request subject prism.v1.infer.{first} with "
        '{"prompt": "Hello", "max_tokens": 16}  (MQTT: topic prism/v1/infer/' + first + ' plus "client_id")',
        *([f"  {curl_line(stack)}"] if opts.api_port else []),
        f"logs: {opts.run_dir}/   (stack.json lists URLs and pids)",
        f"metrics: /metrics of every service on 127.0.0.1; scrape config {stack.prometheus_config}",
        "a child that dies is restarted; Ctrl-C stops everything.",
    ]
    return "\n".join(lines)
