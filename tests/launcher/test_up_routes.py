"""`prism up --policy route|pipeline`: the stack serves with routes from the first request.

Three nodes behind delayed links, each with one embedded host that has room for a third of the
model's experts: epoch 1 is the pipeline split (each node holds every expert of its layer range, every
home's route runs each range where its experts are). A plain NATS client gets the answers of the model
in one process from every node, and no expert call crosses the bus: each layer runs where its experts
are, only the hidden states hop.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.checkpoints import make_tiny_checkpoint
from tests.launcher.test_up import prism_status, prism_up
from tests.serving.conftest import reference

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("policy", ["pipeline", "route"])
def test_up_with_a_routed_policy_serves_through_the_pipeline_split(tmp_path: Path, policy: str) -> None:
    from shared.model.checkpoint import load_config

    model = make_tiny_checkpoint("mixtral", tmp_path / "model", seed=5, num_hidden_layers=6)
    config = load_config(model)
    memory_mb = 18 * config.expert_nbytes("float32") / 2**20  # 16 experts of two layers, and a little room
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    expected = reference(model, prompts, max_tokens=6)
    args = ["--nodes", "3", "--hosts-per-node", "1", "--memory-mb", f"{memory_mb:.4f}", "--delay-ms", "1",
            "--policy", policy, "--model", str(model)]
    with prism_up(*args, run_dir=tmp_path / "run") as (process, url):

        async def ask_every_node() -> list[dict[str, Any]]:  # plain NATS requests, as any client sends them
            import nats

            nc = await nats.connect(url)
            try:
                msgs = await asyncio.gather(*(
                    nc.request(f"prism.v1.infer.node{i}", json.dumps({"input_ids": p, "max_tokens": 6}).encode(),
                               timeout=60)
                    for i, p in enumerate(prompts)
                ))
            finally:
                await nc.close()
            return [json.loads(m.data) for m in msgs]

        answers = asyncio.run(ask_every_node())
        assert [a.get("token_ids") for a in answers] == expected, answers
        manifest = json.loads((tmp_path / "run" / "stack.json").read_text())
        layers = {host: sorted({k[0] for k in keys}) for host, keys in manifest["placement"].items()}
        assert layers == {"node0-h0": [0, 1], "node1-h0": [2, 3], "node2-h0": [4, 5]}
        found = json.loads(prism_status(url, "--json", check=True).stdout)
        assert {n: g["route"] for n, g in found["gatings"].items()} == {
            f"node{i}": ["node0", "node0", "node1", "node1", "node2", "node2"] for i in range(3)
        }
        assert sum(g["segments_run"] for g in found["gatings"].values()) > 0
        text = prism_status(url, check=True).stdout
        assert "node1: gating up, 0/32 running, 0 waiting, route node0 node0 node1 node1 node2 node2" in text, text
        hosts = found["hosts"]
        assert all(h["direct_calls"] > 0 for h in hosts), hosts
        crossed = sum(h["calls_served"] for h in hosts)
        assert crossed == 0, "an expert call crossed the bus: a layer ran away from its experts"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
