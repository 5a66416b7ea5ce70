"""docker-compose.yml without a Docker engine: its structure, that every PRISM_* variable is a real
settings field with a valid value, that every referenced file exists, that the static expert
placement covers the demo model, and that the nats configs work with real nats-server processes
(credentials from the environment, leaf to hub)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import tomllib
import typing
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import nats
import pytest
import yaml

from services.api.settings import ApiSettings
from services.expert_host.settings import ExpertHostSettings
from services.gating.settings import GatingSettings
from services.migrator.settings import MigratorSettings
from services.placement.settings import PlacementSettings
from shared.nats_server import find_binary, free_port
from shared.topology import load_topology

REPO = Path(__file__).resolve().parents[2]
SETTINGS = {
    "services.gating": (GatingSettings, "PRISM_GATING_"),
    "services.expert_host": (ExpertHostSettings, "PRISM_HOST_"),
    "services.placement": (PlacementSettings, "PRISM_PLACEMENT_"),
    "services.migrator": (MigratorSettings, "PRISM_MIGRATOR_"),
    "services.api": (ApiSettings, "PRISM_API_"),
}
VAR = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?::?[-?][^}]*)?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def example_env() -> dict[str, str]:
    lines = (REPO / "docker" / "env.example").read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if line.strip() and not line.startswith("#")]
    return dict(pairs)


def substitute(value: str, env: dict[str, str]) -> str:
    """Compose-style ${VAR}, ${VAR:-default}, ${VAR:?message} with `env`."""
    return VAR.sub(lambda m: env[m.group(1)], value)


def python_services(compose: dict[str, Any]) -> dict[str, tuple[str, dict[str, str]]]:
    """Service name → (module, environment) of every service that runs a Prism Python module."""
    out = {}
    for name, service in compose["services"].items():
        command = service.get("command", [])
        if command[:2] == ["python", "-m"]:
            out[name] = (command[2], service["environment"])
    return out


TESTBED = REPO / "topologies" / "testbed.toml"


def test_services_match_the_testbed_topology(compose: dict[str, Any]) -> None:
    """A hub, placement, migrator, and three nodes with a leaf, a gating and 1, 1 and 2 hosts: three
    embedded in their gating, edge-c-gpu1 a container of its own."""
    topology = load_topology(TESTBED)
    assert [len(node.hosts) for node in topology.nodes] == [1, 1, 2]
    services = compose["services"]
    expected = {"hub"} | {f"leaf-{n.name}" for n in topology.nodes} | {f"gating-{n.name}" for n in topology.nodes}
    expected |= {"host-edge-c-gpu1", "placement", "migrator", "api"}
    assert set(services) == expected
    assert len(services) == 1 + 3 * 2 + 1 + 2 + 1
    for node, host in topology.hosts():
        if host.embedded:
            embedded = json.loads(services[f"gating-{node.name}"]["environment"]["PRISM_GATING_EMBEDDED_HOSTS"])
            env = next(e for e in embedded if e["host"] == host.name)
            assert env["memory_limit_mb"] == host.memory_mb
            continue
        env = services[f"host-{host.name}"]["environment"]
        assert env["PRISM_HOST_HOST"] == host.name
        assert env["PRISM_HOST_NODE"] == node.name
        assert float(env["PRISM_HOST_MEMORY_LIMIT_MB"]) == host.memory_mb
        assert env["PRISM_HOST_NATS_URL"] == f"nats://leaf-{node.name}:4222"  # its own node's leaf
    assert sum(len(json.loads(services[f"gating-{n.name}"]["environment"]["PRISM_GATING_EMBEDDED_HOSTS"]))
               for n in topology.nodes) == 3
    for node in topology.nodes:
        assert services[f"leaf-{node.name}"]["environment"]["PRISM_NODE"] == node.name
        assert services[f"leaf-{node.name}"]["depends_on"] == ["hub"]
        gating = services[f"gating-{node.name}"]["environment"]
        assert gating["PRISM_GATING_NODE"] == node.name
        assert gating["PRISM_GATING_NATS_URL"] == f"nats://leaf-{node.name}:4222"


def test_every_service_is_what_prism_up_starts_for_the_testbed(compose: dict[str, Any]) -> None:
    """Command, environment and dependency of each Python service are those of `prism up --topology
    topologies/testbed.toml` (cli.stack_plan, busy polling off), but for the addresses (its node's leaf,
    or the hub), the model's path in the container and the credentials; ports and payload limits match
    the launcher's defaults and the nats configs."""
    from cli.stack_plan import StackOptions, plan_stack

    options = StackOptions(topology=load_topology(TESTBED), model=REPO / "models" / "demo", run_dir=REPO / "var")
    plan = plan_stack(options, environ={}, cores=1)
    services = compose["services"]
    assert set(python_services(compose)) == {spec.name for spec in plan.services}
    for spec in plan.services:
        service = services[spec.name]
        assert service["command"] == ["python", "-m", spec.module], spec.name
        assert service["depends_on"] == [f"leaf-{spec.node}" if spec.node else "hub"], spec.name
        api = spec.name == "api"  # a client of the bus, and the one service with a port of its own
        user = "CLIENT" if api else "SERVICE"
        want = {
            **spec.settings,
            f"{spec.prefix}MODEL": "/models/demo",
            f"{spec.prefix}NATS_URL": f"nats://leaf-{spec.node}:4222" if spec.node else "nats://hub:4222",
            f"{spec.prefix}NATS_USER": f"${{PRISM_{user}_USER}}",
            f"{spec.prefix}NATS_PASSWORD": f"${{PRISM_{user}_PASSWORD}}",
            f"{spec.prefix}METRICS_PORT": "9464",  # on the compose network only: no port is published
            f"{spec.prefix}METRICS_BIND": "0.0.0.0",
        }
        if api:  # every address of the container, so the published port reaches it: a key is required
            key = "${PRISM_API_KEY:?set PRISM_API_KEY (see docker/env.example)}"
            want |= {"PRISM_API_HOST": "0.0.0.0", "PRISM_API_KEY": key}
            assert service["ports"] == [f"${{PRISM_BIND:-127.0.0.1}}:{options.api_port}:{options.api_port}"]
        else:
            assert "ports" not in service, spec.name
        assert service["environment"] == want, spec.name
    hub = services["hub"]
    published = [port.removeprefix("${PRISM_BIND:-127.0.0.1}:") for port in hub["ports"]]
    assert published == [f"{p}:{p}" for p in (options.port, options.mqtt_port, options.http_port)]
    for conf in ("hub.conf", "leaf.conf"):
        text = (REPO / "docker" / "nats" / conf).read_text()
        assert f"max_payload: {plan.max_payload}\n" in text, conf
    hub_conf = (REPO / "docker" / "nats" / "hub.conf").read_text()
    for port in (options.port, options.mqtt_port, options.http_port, 7422):
        assert f'"0.0.0.0:{port}"' in hub_conf


def test_python_service_variables_are_settings_fields_with_valid_values(
    compose: dict[str, Any], example_env: dict[str, str]
) -> None:
    services = python_services(compose)
    assert {module for module, _ in services.values()} == set(SETTINGS)
    for name, (module, env) in services.items():
        cls, prefix = SETTINGS[module]
        values = {}
        for key, value in env.items():
            assert key.startswith(prefix), f"{name}: {key} is not a {cls.__name__} variable ({prefix}*)"
            field = key.removeprefix(prefix).lower()
            assert field in cls.model_fields, f"{name}: {key} is not a field of {cls.__name__}"
            values[field] = substitute(str(value), example_env)
            if typing.get_origin(cls.model_fields[field].annotation) in (list, dict):
                values[field] = json.loads(values[field])  # pydantic-settings reads these as JSON
        cls.model_validate(values)  # every value passes the field's validation
        assert env[f"{prefix}NATS_USER"], f"{name} must authenticate"
        assert env[f"{prefix}NATS_PASSWORD"], f"{name} must authenticate"


def test_every_variable_has_an_example_and_ports_stay_on_loopback(
    compose: dict[str, Any], example_env: dict[str, str]
) -> None:
    used = set(VAR.findall((REPO / "docker-compose.yml").read_text()))
    assert used <= set(example_env), f"missing from docker/env.example: {sorted(used - set(example_env))}"
    assert example_env["PRISM_BIND"] == "127.0.0.1"
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("${PRISM_BIND:-127.0.0.1}:"), f"{name} publishes {port} beyond loopback"
    assert [name for name, s in compose["services"].items() if s.get("ports")] == ["hub", "api"]


def test_referenced_files_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and source != "./models":  # the model is data, checked below
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
        if "build" in service:
            assert (REPO / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"Dockerfile copies missing {source}"
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(p for p in pins if p.startswith("torch=="))
    assert f'"{torch_pin}"' in dockerfile, "the Dockerfile must install pyproject's torch pin"


def test_static_placement_covers_the_demo_model(compose: dict[str, Any]) -> None:
    """Every (layer, expert) of models/demo is held by some host, each within its memory limit."""
    from services.expert_host.residency import check_budget, parse_experts

    if not (REPO / "models" / "demo" / "config.json").is_file():
        pytest.skip("models/demo is not there yet")
    from shared.model.checkpoint import load_config
    from shared.model.config import list_moe_layers

    config = load_config(REPO / "models" / "demo")
    held: set[tuple[int, int]] = set()
    hosts = []  # (experts, memory limit MiB, dtype) of every host, embedded or a process
    for _, env in python_services(compose).values():
        if "PRISM_HOST_EXPERTS" in env:
            hosts.append((env["PRISM_HOST_EXPERTS"], env["PRISM_HOST_MEMORY_LIMIT_MB"], env["PRISM_HOST_DTYPE"]))
        for host in json.loads(env.get("PRISM_GATING_EMBEDDED_HOSTS", "[]")):
            hosts.append((host["experts"], host["memory_limit_mb"], env["PRISM_GATING_DTYPE"]))
    assert len(hosts) == 4
    for experts, memory_mb, dtype in hosts:
        keys = parse_experts(experts, list_moe_layers(config), config.num_experts)
        check_budget(len(keys), config.expert_nbytes(dtype), int(float(memory_mb) * 2**20))
        held |= set(keys)
    assert held == {(layer, e) for layer in list_moe_layers(config) for e in range(config.num_experts)}


# ---- the nats configs, run for real -------------------------------------------------------------


def conf_vars(path: Path) -> set[str]:
    """$VARIABLES the server takes from the environment: referenced outside comments and quoted
    strings ("$SRV.PING" is a subject), and not defined in the file itself (SERVICE = {...})."""
    code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
    code = re.sub(r'"[^"]*"', '""', code)
    defined = set(re.findall(r"^\s*([A-Z_][A-Z0-9_]*)\s*=", code, re.M))
    return set(re.findall(r"\$([A-Z_][A-Z0-9_]*)", code)) - defined


def test_nats_config_variables_come_from_the_service_environment(compose: dict[str, Any]) -> None:
    services = compose["services"]
    hub_env = set(services["hub"]["environment"])
    assert conf_vars(REPO / "docker" / "nats" / "hub.conf") == hub_env
    for name, service in services.items():
        if name.startswith("leaf-"):
            assert conf_vars(REPO / "docker" / "nats" / "leaf.conf") == set(service["environment"])


def localise(path: Path, replacements: dict[str, str], out: Path) -> Path:
    """The config with container addresses swapped for free loopback ports (each must occur once)."""
    text = path.read_text()
    for old, new in replacements.items():
        assert text.count(old) == 1, f"{old!r} in {path}"
        text = text.replace(old, new)
    out.write_text(text)
    return out


@contextlib.asynccontextmanager
async def nats_process(conf: Path, env: dict[str, str], port: int) -> AsyncIterator[None]:
    process = await asyncio.create_subprocess_exec(
        str(find_binary()), "-c", str(conf), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        async with asyncio.timeout(10):
            while True:
                assert process.returncode is None, f"nats-server -c {conf.name} exited with {process.returncode}"
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.close()
                    break
                except OSError:
                    await asyncio.sleep(0.05)
        yield
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()


async def test_hub_and_leaf_configs_authenticate_and_connect(tmp_path: Path, example_env: dict[str, str]) -> None:
    env = dict(example_env)
    hub_port, leaf_listen, leaf_client, mqtt_port = free_port(), free_port(), free_port(), free_port()
    hub_conf = localise(REPO / "docker" / "nats" / "hub.conf", {
        '"0.0.0.0:4222"': f'"127.0.0.1:{hub_port}"', '"0.0.0.0:8222"': f'"127.0.0.1:{free_port()}"',
        '"0.0.0.0:1883"': f'"127.0.0.1:{mqtt_port}"', '"0.0.0.0:7422"': f'"127.0.0.1:{leaf_listen}"',
        '"/data/jetstream"': f'"{tmp_path / "js"}"'}, tmp_path / "hub.conf")
    leaf_conf = localise(REPO / "docker" / "nats" / "leaf.conf", {
        '"0.0.0.0:4222"': f'"127.0.0.1:{leaf_client}"'}, tmp_path / "leaf.conf")
    service = {"user": env["PRISM_SERVICE_USER"], "password": env["PRISM_SERVICE_PASSWORD"]}
    client = {"user": env["PRISM_CLIENT_USER"], "password": env["PRISM_CLIENT_PASSWORD"]}
    leaf_url = f"nats://{env['PRISM_LEAF_USER']}:{env['PRISM_LEAF_PASSWORD']}@127.0.0.1:{leaf_listen}"
    leaf_env = {**env, "PRISM_NODE": "edge-a", "PRISM_HUB_LEAF_URL": leaf_url}
    async with nats_process(hub_conf, env, hub_port), nats_process(leaf_conf, leaf_env, leaf_client):
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):  # no credentials, no connection
            await nats.connect(f"nats://127.0.0.1:{hub_port}", allow_reconnect=False, max_reconnect_attempts=1,
                               error_cb=ignore)
        hub = await nats.connect(f"nats://127.0.0.1:{hub_port}", **service)
        leaf = await nats.connect(f"nats://127.0.0.1:{leaf_client}", **service)
        try:
            async def pong(msg: nats.aio.msg.Msg) -> None:
                await msg.respond(b"pong")

            await hub.subscribe("prism.v1.infer.edge-a", cb=pong)
            await hub.flush()
            async with asyncio.timeout(10):  # the leaf connection (with its credentials) carries it
                while True:
                    try:
                        reply = await leaf.request("prism.v1.infer.edge-a", b"ping", timeout=0.5)
                        break
                    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                        await asyncio.sleep(0.1)
            assert reply.data == b"pong"
            await client_permissions(hub, f"nats://127.0.0.1:{hub_port}", client)
            await device_permissions(hub, mqtt_port, client)
        finally:
            await leaf.close()
            await hub.close()


async def client_permissions(service: nats.NATS, url: str, creds: dict[str, str]) -> None:
    """A client may ask a node and get the answer; it may not reach internal subjects."""
    errors: list[str] = []

    async def record(exc: Exception) -> None:
        errors.append(str(exc))

    internal = await service.subscribe("prism.v1.host.>")
    nc = await nats.connect(url, error_cb=record, **creds)
    try:
        assert (await nc.request("prism.v1.infer.edge-a", b"ping", timeout=5)).data == b"pong"
        # allowed (the HTTP API uses them): a cancel, and reading the gatings' load; a refusal would come first
        await nc.publish("prism.v1.infer.edge-a.cancel", b'{"reply_to": "_INBOX.x"}')
        await nc.publish("$SRV.STATS.prism-gating", b"")
        await nc.publish("prism.v1.host.edge-a-gpu0.status", b'{"host": "spoofed"}')
        await nc.subscribe("prism.v1.expert.>")
        await nc.flush()
        async with asyncio.timeout(5):
            while len(errors) < 2:  # noqa: ASYNC110 - filled by the error callback
                await asyncio.sleep(0.05)
        assert sorted(errors) == [
            'nats: permissions violation for publish to "prism.v1.host.edge-a-gpu0.status"',
            'nats: permissions violation for subscription to "prism.v1.expert.>"',
        ]
        with pytest.raises(nats.errors.TimeoutError):
            await internal.next_msg(timeout=0.5)
    finally:
        await nc.close()


async def device_permissions(service: nats.NATS, mqtt_port: int, creds: dict[str, str]) -> None:
    """An MQTT device with the client credentials: its request arrives and its reply reaches it; a
    spoofed heartbeat does not arrive."""
    requests = await service.subscribe("prism.v1.infer.edge-a")
    heartbeats = await service.subscribe("prism.v1.host.>")
    await service.flush()
    async with aiomqtt.Client("127.0.0.1", mqtt_port, identifier="dev-1", username=creds["user"],
                              password=creds["password"]) as device:
        await device.subscribe("prism/v1/reply/dev-1")
        await device.publish("prism/v1/host/x/status", b'{"host": "spoofed"}')
        await device.publish("prism/v1/infer/edge-a", b'{"prompt": "hi", "client_id": "dev-1"}')
        assert (await requests.next_msg(timeout=5)).data == b'{"prompt": "hi", "client_id": "dev-1"}'
        await service.publish("prism.v1.reply.dev-1", b"answer")
        async with asyncio.timeout(5):
            message = await anext(aiter(device.messages))
        assert bytes(message.payload) == b"answer"  # type: ignore[arg-type]
    with pytest.raises(nats.errors.TimeoutError):
        await heartbeats.next_msg(timeout=0.5)


async def ignore(exc: Exception) -> None:
    """The expected authorization error is asserted through the raised exception."""


def test_nats_configs_refuse_to_start_without_credentials(tmp_path: Path) -> None:
    result = subprocess.run([str(find_binary()), "-t", "-c", str(REPO / "docker" / "nats" / "hub.conf")],
                            capture_output=True, text=True, env={}, check=False, timeout=30)
    assert result.returncode != 0
    assert "PRISM_" in result.stderr + result.stdout
