"""What `prism up` starts, worked out before anything starts: pure (it reads the model's config.json,
and nothing runs). cli/stack.py starts what this describes; docker-compose.yml describes the same
services, and tests/launcher/test_compose.py reads it against `plan_stack`.

Per node a gating, with the node's embedded expert hosts in its process (`embedded = true`, the
default), and a process per other expert host, all connected to the node's leaf server; on the hub the
placement service and the migrator (KV writes from a leaf get "no responders"). Each service is
configured by environment variables only: `settings` are the ones the launcher sets (the wiring of
the stack, and the stack options), everything else comes from the caller's environment.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shared.settings import DEFAULT_HOST_TTL_S
from shared.topology import NodeSpec, Topology, TopologyError, initial_placement

if TYPE_CHECKING:  # the model code imports torch: the CLI loads it only when it starts a stack
    from shared.model.config import ModelConfig

MIB = 2**20
MIN_PAYLOAD = 8 * MIB
MAX_PAYLOAD = 64 * MIB  # the services' max_payload_bytes bound (and NATS's hard limit)


class StackError(RuntimeError):
    """The stack could not start (bad model, taken port, topology too small, a child failed)."""


@dataclass(frozen=True)
class StackOptions:
    """What `prism up` starts. Ports: `port` 0 picks a free one; 0 disables MQTT / monitoring / the HTTP API."""

    topology: Topology
    model: Path
    run_dir: Path
    port: int = 4222
    mqtt_port: int = 1883
    http_port: int = 8222
    api_port: int = 8000
    max_context: int = 1024
    expert_timeout_s: float = 2.0
    activation_interval_s: float = 2.0
    ready_timeout_s: float = 180.0
    stop_timeout_s: float = 10.0
    log_level: str = "info"
    policy: str = "prism"
    plan_interval_s: float = 10.0
    migration_cost_calls: float = 50.0
    min_window_tokens: int = 256
    host_ttl_s: float = DEFAULT_HOST_TTL_S  # gating, placement and migrator alike


@dataclass(frozen=True)
class ServiceSpec:
    """One service process, `python -m <module>`; `node` is the node whose leaf it uses (None: the hub)."""

    name: str
    module: str
    prefix: str
    node: str | None
    settings: dict[str, str]
    """PRISM_* variables the launcher sets, all but `<prefix>NATS_URL` (known once the servers run)."""


@dataclass(frozen=True)
class StackPlan:
    model_name: str
    expert_bytes: int
    max_payload: int
    placement: dict[str, list[tuple[int, int]]]
    """Epoch 1: host → (layer, expert) pairs it starts with."""
    services: tuple[ServiceSpec, ...]
    routes: dict[str, list[str]] | None = None
    """Epoch 1's routes (home node → executing node per layer); None: every node runs every layer."""


def max_payload_for(hidden_size: int, max_context: int) -> int:
    """Server max_payload (bytes): a whole prompt's fp32 hidden states to one expert, twice over
    for headers and envelope, at least 8 MiB, at most 64 MiB (dispatch splits larger batches)."""
    return min(MAX_PAYLOAD, max(MIN_PAYLOAD, 2 * max_context * hidden_size * 4))


def plan_stack(opts: StackOptions, environ: Mapping[str, str], cores: int) -> StackPlan:
    """The services to start for `opts`; StackError when the model or the topology does not do.
    `environ` and `cores` decide what is not the launcher's to set (busy polling, compute threads, log
    level)."""
    from shared.model.checkpoint import load_config
    from shared.model.config import list_moe_layers
    from shared.model.errors import ModelError

    try:
        config = load_config(opts.model)
    except ModelError as exc:
        raise StackError(f"invalid model directory {opts.model}: {exc}") from None
    expert_bytes = config.expert_nbytes(opts.topology.dtype)
    routes = None
    try:
        if opts.policy in ROUTED_POLICIES:
            placement, routes = pipeline_start(opts.topology, config, expert_bytes)
        else:
            placement = initial_placement(opts.topology, list_moe_layers(config), config.num_experts, expert_bytes)
    except TopologyError as exc:
        raise StackError(str(exc)) from None
    max_payload = max_payload_for(config.hidden_size, opts.max_context)
    wiring = {"MODEL": str(opts.model.resolve()), "MAX_PAYLOAD_BYTES": str(max_payload), "LOG_FORMAT": "json"}
    services = [
        *_hosts(opts, placement, expert_bytes, environ, cores),
        *_gatings(opts, placement, expert_bytes, environ, cores),
        *_control_plane(opts),
        *_api(opts),
    ]
    return StackPlan(
        model_name=opts.model.resolve().name,
        expert_bytes=expert_bytes,
        max_payload=max_payload,
        placement=placement,
        routes=routes,
        services=tuple(
            ServiceSpec(name, module, prefix, node, {
                f"{prefix}LOG_LEVEL": environ.get(f"{prefix}LOG_LEVEL", opts.log_level),
                **{prefix + key: value for key, value in wiring.items()},
                **own,
            })
            for name, module, prefix, node, own in services
        ),
    )


_Service = tuple[str, str, str, str | None, dict[str, str]]

ROUTED_POLICIES = ("pipeline", "route")
"""Policies whose plans carry routes: `prism up` starts them from the pipeline split (no statistics yet)."""


def pipeline_start(
    topology: Topology, config: ModelConfig, expert_bytes: int
) -> tuple[dict[str, list[tuple[int, int]]], dict[str, list[str]] | None]:
    """Epoch 1 for a routed policy: the `pipeline` split of the topology (contiguous layer ranges in
    proportion to each node's memory, a node holding every expert of its range) and its routes."""
    import numpy as np

    from services.placement.errors import PlacementError
    from services.placement.planner import ClusterView, to_plan_routes
    from services.placement.policies.pipeline import pipeline
    from services.placement.topology import cluster_from_launcher
    from shared.model.config import list_moe_layers

    cluster, nodes = cluster_from_launcher(topology, expert_bytes)
    hosts = [host.name for _, host in topology.hosts()]
    moe = list_moe_layers(config)
    try:
        placed = pipeline(np.zeros((len(nodes), len(moe), config.num_experts)), cluster)
    except PlacementError as exc:
        raise TopologyError(f"no pipeline split of the model fits the topology: {exc}") from None
    placement = {
        host: [(moe[int(layer)], int(expert)) for layer, expert in zip(*np.nonzero(placed.hosts[i]), strict=True)]
        for i, host in enumerate(hosts)
    }
    view = ClusterView(cluster, nodes, hosts)
    return placement, to_plan_routes(placed.routes, view, moe, config.num_layers)


def _hosts(
    opts: StackOptions, placement: dict[str, list[tuple[int, int]]], expert_bytes: int, environ: Mapping[str, str],
    cores: int,
) -> list[_Service]:
    hosts = [(node, host) for node, host in opts.topology.hosts() if not host.embedded]
    # A host process busy-polls after a message only where every host and gating can have a core of its
    # own: on fewer cores the spinning takes CPU from the others (bench/serving.py measures both).
    spare_cores = cores > len(hosts) + len(opts.topology.nodes)
    busy_poll_s = environ.get("PRISM_HOST_BUSY_POLL_S", "0.002" if spare_cores else "0")
    return [
        (f"host-{host.name}", "services.expert_host", "PRISM_HOST_", node.name, {
            "PRISM_HOST_HOST": host.name,
            "PRISM_HOST_NODE": node.name,
            "PRISM_HOST_EXPERTS": format_experts(placement[host.name]),
            "PRISM_HOST_MEMORY_LIMIT_MB": f"{host.memory_limit_mb(expert_bytes):.6f}",
            "PRISM_HOST_DEVICE": host.device,
            "PRISM_HOST_SPEED": str(host.speed),
            "PRISM_HOST_DTYPE": opts.topology.dtype,
            "PRISM_HOST_BUSY_POLL_S": busy_poll_s,
        })
        for node, host in hosts
    ]


def _gatings(
    opts: StackOptions, placement: dict[str, list[tuple[int, int]]], expert_bytes: int, environ: Mapping[str, str],
    cores: int,
) -> list[_Service]:
    # Each node's big steps (a long prefill) get its share of this machine's cores as torch threads: one
    # node alone uses them all, a testbed of several shares them. Small steps (decode) compute on one
    # (INLINE_THREADS), where a second core costs more in fork and join than it saves.
    threads = environ.get("PRISM_GATING_COMPUTE_THREADS", str(max(1, cores // len(opts.topology.nodes))))
    return [
        (f"gating-{node.name}", "services.gating", "PRISM_GATING_", node.name, {
            "PRISM_GATING_NODE": node.name,
            "PRISM_GATING_DTYPE": opts.topology.dtype,  # hosts refuse hidden states of another dtype
            "PRISM_GATING_MAX_CONTEXT": str(opts.max_context),
            "PRISM_GATING_EXPERT_TIMEOUT_S": str(opts.expert_timeout_s),
            "PRISM_GATING_ACTIVATION_INTERVAL_S": str(opts.activation_interval_s),
            "PRISM_GATING_HOST_TTL_S": str(opts.host_ttl_s),
            "PRISM_GATING_LINKS": opts.topology.links_json(),
            "PRISM_GATING_EMBEDDED_HOSTS": embedded_hosts_json(node, placement, expert_bytes),
            "PRISM_GATING_COMPUTE_THREADS": threads,
        })
        for node in opts.topology.nodes
    ]


def embedded_hosts_json(node: NodeSpec, placement: dict[str, list[tuple[int, int]]], expert_bytes: int) -> str:
    """PRISM_GATING_EMBEDDED_HOSTS for `node`: its hosts that live in its gating, with their first experts."""
    return json.dumps([
        {
            "host": host.name,
            "experts": format_experts(placement[host.name]),
            "memory_limit_mb": round(host.memory_limit_mb(expert_bytes), 6),
            "device": host.device,
            "speed": host.speed,
        }
        for host in node.hosts
        if host.embedded
    ], separators=(",", ":"))


def _control_plane(opts: StackOptions) -> list[_Service]:
    from cli.control_plane import control_plane_env

    placement, migrator = control_plane_env(opts)
    return [
        ("placement", "services.placement", "PRISM_PLACEMENT_", None, placement),
        ("migrator", "services.migrator", "PRISM_MIGRATOR_", None, migrator),
    ]


def _api(opts: StackOptions) -> list[_Service]:
    """The HTTP API on the hub (it asks any node); its address and key come from the environment
    (PRISM_API_HOST, PRISM_API_KEY: loopback and no key unless set)."""
    if not opts.api_port:
        return []
    return [("api", "services.api", "PRISM_API_", None, {"PRISM_API_PORT": str(opts.api_port)})]


def service_env(
    spec: ServiceSpec, nats_url: str, environ: Mapping[str, str], pythonpath: str, *, metrics_port: int = 0
) -> dict[str, str]:
    """The whole environment of the service's process: the caller's, overridden by what the launcher sets."""
    return {
        **environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [pythonpath, environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": environ.get("OMP_NUM_THREADS", "1"),
        **spec.settings,
        **addresses(spec, nats_url, metrics_port),
    }


def addresses(spec: ServiceSpec, nats_url: str, metrics_port: int) -> dict[str, str]:
    """The variables known once the servers run and the ports are picked: the NATS URL, and where
    /metrics listens (loopback; with metrics_port 0 the environment's, by default off)."""
    out = {f"{spec.prefix}NATS_URL": nats_url}
    if metrics_port:
        out |= {f"{spec.prefix}METRICS_PORT": str(metrics_port), f"{spec.prefix}METRICS_BIND": "127.0.0.1"}
    return out


def ignored_env(spec: ServiceSpec, nats_url: str, environ: Mapping[str, str], *, metrics_port: int = 0) -> set[str]:
    """PRISM_* variables of `environ` that the launcher overrides for this service (`prism up` warns)."""
    wiring = {**spec.settings, **addresses(spec, nats_url, metrics_port)}
    wiring.pop(f"{spec.prefix}LOG_LEVEL", None)  # the environment's, where it has one
    return {key for key, value in wiring.items() if _overridden(environ.get(key), value)}


def prometheus_config(targets: Mapping[str, tuple[str, str]], scrape_interval_s: float = 5.0) -> str:
    """A Prometheus scrape config (YAML) for `targets`: service name → (module, "host:port" of its
    /metrics). One job per kind of service (`prism_gating`, `prism_expert_host`, ...); each target
    carries its service name as the label `service`."""
    jobs: dict[str, list[tuple[str, str]]] = {}
    for name, (module, address) in targets.items():
        jobs.setdefault("prism_" + module.rsplit(".", 1)[-1], []).append((name, address))
    lines = ["global:", f"  scrape_interval: {scrape_interval_s:g}s", "scrape_configs:"]
    for job, members in jobs.items():
        lines += [f"  - job_name: {job}", "    static_configs:"]
        for name, address in members:
            lines += [f'      - targets: ["{address}"]', f"        labels: {{service: {name}}}"]
    return "\n".join(lines) + "\n"


def _overridden(given: str | None, value: str) -> bool:
    """The environment sets the variable to something else than `value` ("3" and "3.0" are the same number)."""
    if given is None or given == value:
        return False
    with contextlib.suppress(ValueError):
        return float(given) != float(value)
    return True


def format_experts(keys: list[tuple[int, int]]) -> str:
    from services.expert_host.residency import format_experts as format_keys

    return format_keys(keys)
