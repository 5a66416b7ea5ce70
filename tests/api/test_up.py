"""`prism up` on the demo model starts the HTTP API: the `curl` line it prints answers, the `openai`
client's greedy completion equals `prism run`'s, chat streams, the node is the least-loaded gating (no
header, no configured node), and SIGTERM stops the API with everything else."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
from openai import OpenAI

from tests.api.conftest import DEMO
from tests.launcher.test_up import PRISM, REPO, alive, prism_up, wait_for_line

pytestmark = pytest.mark.slow


def test_prism_up_serves_the_openai_api_on_the_demo_model(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with prism_up("--nodes", "1", "--hosts-per-node", "1", "--model", str(DEMO), run_dir=run_dir) as (process, _):
        curl = next(line.strip() for line in wait_for_line(process, "curl ", 10) if "curl " in line)
        manifest = json.loads((run_dir / "stack.json").read_text())
        api_url = manifest["api_url"]
        assert curl.startswith(f"curl {api_url}/v1/completions ")
        printed = subprocess.run(curl + " -s", shell=True, capture_output=True, text=True, timeout=60, check=True)
        answer = json.loads(printed.stdout)
        assert answer["model"] == "demo"
        finish = answer["choices"][0]["finish_reason"]
        assert (finish, answer["usage"]["completion_tokens"]) == ("length", 16) or finish == "stop"

        prompt, n = "def fib(n):", 12
        ran = subprocess.run([*PRISM, "run", "--json", "--dtype", "fp32", "--prompt", prompt, "--max-tokens", str(n)],
                             capture_output=True, text=True, cwd=REPO, timeout=120, check=True)
        with OpenAI(base_url=f"{api_url}/v1", api_key="unused", max_retries=0) as client:
            raw = client.completions.with_raw_response.create(model="demo", prompt=prompt, max_tokens=n, temperature=0)
            assert raw.headers["x-prism-node"] == "node0"  # no header, no configured node: the least loaded
            assert raw.parse().choices[0].text == json.loads(ran.stdout)["text"]
            stream = client.chat.completions.create(model="demo", max_tokens=4, temperature=0, stream=True,
                                                    messages=[{"role": "user", "content": "Hello"}])
            chunks = list(stream)
            assert chunks[-1].choices[0].finish_reason in ("length", "stop")
        pids = manifest["pids"]
        assert alive(pids["api"])
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert not alive(pids["api"])
        assert "api_stopped" in (run_dir / "api.log").read_text()  # a clean stop, not a kill
