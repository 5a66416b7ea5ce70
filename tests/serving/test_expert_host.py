"""One expert host on a real nats-server: coded errors for bad batches, discovery, status, drain."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import msgpack
import nats
import pytest
import torch

from shared import subjects
from shared.codec import decode_tensor, encode_tensor
from shared.model.checkpoint import load_expert
from shared.model.moe import expert_forward
from shared.schemas import HostStatus
from tests.serving.conftest import LocalCluster


async def test_bad_batches_get_coded_errors_and_the_host_keeps_serving(
    cluster: LocalCluster, mixtral_dir: Path
) -> None:
    await cluster.add_node("a")
    host = await cluster.add_host("a", "h", mixtral_dir, "0:0-3")
    nc = await cluster.connect("a")
    D = host.hidden_size
    cases = [
        (subjects.expert(0, 0), encode_tensor(torch.zeros(3, D + 1)), "400", "bad_tensor"),
        (subjects.expert(0, 0), encode_tensor(torch.zeros(3, D, dtype=torch.float16)), "400", "bad_tensor"),
        (subjects.expert(0, 0), b"\x93garbage", "400", "bad_tensor"),
        (
            subjects.expert(0, 0),
            msgpack.packb({"v": 1, "dtype": "float32", "shape": [2, D], "data": b"x"}),
            "400",
            "bad_tensor",
        ),
    ]
    for subject, payload, status, code in cases:
        reply = await nc.request(subject, payload, timeout=5)
        assert reply.headers is not None
        assert reply.headers["Nats-Service-Error-Code"] == status
        assert json.loads(reply.data)["error"]["code"] == code
    x = torch.randn(5, D)
    reply = await nc.request(subjects.expert(0, 2), encode_tensor(x), timeout=5)
    out, _ = decode_tensor(reply.data)
    assert torch.equal(out, expert_forward(load_expert(mixtral_dir, 0, 2), x))
    assert host.counters.errors == len(cases)
    status = host.status()  # refused batches are errors, not served messages or busy time
    assert (status.messages_served, status.calls_served, status.tokens_served) == (1, 1, 5)
    assert 0 < status.busy_s < 5


async def test_unknown_expert_is_refused_by_name(cluster: LocalCluster, mixtral_dir: Path) -> None:
    await cluster.add_node("a")
    host = await cluster.add_host("a", "h", mixtral_dir, "0:0")
    # a batch can only reach this host for an expert it does not hold through a stale subscription
    await host.nc.subscribe(subjects.expert(0, 5), queue=subjects.EXPERT_QUEUE, cb=host._on_message)
    nc = await cluster.connect("a")
    reply = await nc.request(subjects.expert(0, 5), encode_tensor(torch.zeros(1, host.hidden_size)), timeout=5)
    assert json.loads(reply.data)["error"]["code"] == "unknown_expert"
    assert "does not hold expert 0.5" in json.loads(reply.data)["error"]["message"]


async def test_discoverable_with_micro_ping_and_status(cluster: LocalCluster, mixtral_dir: Path) -> None:
    await cluster.add_node("a")
    host = await cluster.add_host("a", "h", mixtral_dir, "1:*")
    nc = await cluster.connect("a")
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish("$SRV.PING.prism-expert-host", b"", reply=inbox)
    async with asyncio.timeout(5):
        while True:
            ping = json.loads((await sub.next_msg(timeout=5)).data)
            if ping["metadata"]["host"] == host.settings.host:
                break
    status = json.loads((await nc.request(subjects.host_cmd(host.settings.host), b'{"kind": "status"}')).data)
    assert status["experts"] == {"1": "ff"}  # a hex mask per layer: experts 0-7
    assert HostStatus.model_validate(status).experts == tuple((1, e) for e in range(8))
    assert status["node"] == cluster.node("a")
    assert 0 < status["memory_used_bytes"] <= status["memory_limit_bytes"]
    bad = await nc.request(subjects.host_cmd(host.settings.host), b'{"kind": "explode"}')
    assert json.loads(bad.data)["error"]["code"] == "invalid_request"


async def test_sigterm_stops_the_process_cleanly(cluster: LocalCluster, mixtral_dir: Path, repo_root: Path) -> None:
    await cluster.add_node("a")
    url = cluster.leaves["a"].cfg.client_url()
    env = {
        **os.environ,
        "PRISM_HOST_NATS_URL": url,
        "PRISM_HOST_MODEL": str(mixtral_dir),
        "PRISM_HOST_HOST": f"{cluster.prefix}-p",
        "PRISM_HOST_EXPERTS": "0:0",
    }
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "services.expert_host", cwd=repo_root, env=env)
    nc = await cluster.connect("a")
    async with asyncio.timeout(30):
        while True:  # ready when the probe is answered
            try:
                await nc.request(subjects.expert(0, 0), b"", timeout=1)
                break
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                await asyncio.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(15):
        assert await proc.wait() == 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [("0:9", "expert 9 does not exist"), ("7:0", "layer 7 does not exist"), ("0", "LAYERS:EXPERTS")],
)
def test_bad_expert_specs_are_clear(mixtral_dir: Path, spec: str, message: str) -> None:
    from services.expert_host.residency import ResidencyError
    from services.expert_host.service import ExpertHostSettings, load_weights

    with pytest.raises(ResidencyError, match=message):
        load_weights(ExpertHostSettings(model=mixtral_dir, experts=spec))


def test_memory_budget_is_enforced(mixtral_dir: Path) -> None:
    from services.expert_host.residency import ResidencyError
    from services.expert_host.service import ExpertHostSettings, load_weights

    with pytest.raises(ResidencyError, match="memory limit"):
        load_weights(ExpertHostSettings(model=mixtral_dir, experts="*:*", memory_limit_mb=0.001))


async def test_busy_poll_lasts_its_window_after_a_batch(cluster: LocalCluster, mixtral_dir: Path) -> None:
    await cluster.add_node("a")
    polling = await cluster.add_host("a", "p", mixtral_dir, "0:0", busy_poll_s=0.2)
    sleeping = await cluster.add_host("a", "s", mixtral_dir, "0:1", busy_poll_s=0)
    nc = await cluster.connect("a")
    for host, expert in ((polling, 0), (sleeping, 1)):
        await nc.request(subjects.expert(0, expert), encode_tensor(torch.zeros(1, host.hidden_size)), timeout=5)
    assert sleeping._spinner is None
    spinner = polling._spinner
    assert spinner is not None
    async with asyncio.timeout(5):  # it ends by itself once the window has passed
        await spinner
    assert polling._spinner is None


async def test_a_bug_in_one_batch_is_answered_and_the_host_goes_on(
    cluster: LocalCluster, mixtral_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await cluster.add_node("a")
    host = await cluster.add_host("a", "h", mixtral_dir, "0:0")
    nc = await cluster.connect("a")
    real = host._run_block
    calls = 0

    def fails_once(*args: object) -> torch.Tensor:  # injected fault: the first batch hits a bug
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug")
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(host, "_run_block", fails_once)
    x = torch.randn(2, host.hidden_size)
    reply = await nc.request(subjects.expert(0, 0), encode_tensor(x), timeout=5)
    assert reply.headers is not None
    assert reply.headers["Nats-Service-Error-Code"] == "500"
    error = json.loads(reply.data)["error"]
    assert error == {"code": "internal", "message": f"host {host.settings.host} failed on this batch"}
    reply = await nc.request(subjects.expert(0, 0), encode_tensor(x), timeout=5)
    assert torch.equal(decode_tensor(reply.data)[0], expert_forward(load_expert(mixtral_dir, 0, 0), x))
    assert host.counters.errors == 1
