"""DeepSeek-V2 and V3 served by Prism over real NATS (hub + one leaf per node).

Two nodes; the routed experts of the MoE layers live on expert hosts (node b lacks experts 4-7),
while MLA, the dense first layer and the shared experts run inside each node's gating with the
compressed latent cache. Greedy answers must equal the in-process model, token for token.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.checkpoints import make_tiny_checkpoint
from tests.serving.conftest import LocalCluster, ask, reference
from tests.serving.test_serving import prompts, spread

pytestmark = pytest.mark.slow

DEEPSEEK = ("deepseek_v2", "deepseek_v3")


@pytest.fixture(scope="session")
def deepseek_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny DeepSeek-V2 (no q-LoRA, group-limited softmax routing, yarn) and V3 (q-LoRA, sigmoid
    routing with a correction bias) checkpoints, each with a dense layer 0 and shared experts."""
    return {family: make_tiny_checkpoint(family, tmp_path_factory.mktemp(family), seed=3) for family in DEEPSEEK}


@pytest.mark.parametrize("family", DEEPSEEK)
async def test_greedy_equals_in_process(cluster: LocalCluster, family: str, deepseek_dirs: dict[str, Path]) -> None:
    model_dir = deepseek_dirs[family]
    await spread(cluster, model_dir)
    batch = prompts(4, seed=7)
    expected = reference(model_dir, batch, max_tokens=12)
    clients = {n: await cluster.connect(n) for n in ("a", "b")}
    served_before = {name: host.counters.calls for name, host in cluster.hosts.items()}
    # Two requests per node at once: each gating batches them (ragged prefill + decode over MLA).
    async with asyncio.timeout(60):
        replies = await asyncio.gather(*(
            ask(clients[n], cluster.node(n), {"input_ids": p, "max_tokens": 12})
            for n, p in zip("abab", batch, strict=True)
        ))
    for i, (reply, _) in enumerate(replies):
        assert reply["token_ids"] == expected[i], f"prompt {i} on node {'abab'[i]}"
    # Routed experts crossed the seam to the hosts; only MoE layers (1, 2) are hosted at all.
    assert all(host.counters.calls > served_before[name] for name, host in cluster.hosts.items())
    assert {layer for host in cluster.hosts.values() for layer, _ in host.weights} == {1, 2}
    # Each gating keeps shared experts local and caches kv_lora_rank + qk_rope_head_dim per token and layer.
    for gating in cluster.gatings.values():
        model = gating.engine.model
        mla = model.config.mla
        assert mla is not None
        assert all(model.layers[i].shared is not None for i in model.config.moe_layers)
        assert gating.engine.cache.nbytes_per_token() == model.config.num_layers * mla.cache_width * 4
