"""`prism demo` end to end on a tiny checkpoint (in this process: the same handler the console
script runs), and its pieces: prompt choice, percentiles, the summary table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cli.demo import ActivationTally, NodeRun, percentile, pick_prompts, summary_table
from tests.launcher.test_up import alive, ports, prism_in_process


def test_demo_runs_summarises_and_stops_everything(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli.main import main

    run_dir = tmp_path / "run"
    args = [
        "demo",
        "--model",
        str(tiny_model),
        "--nodes",
        "2",
        "--hosts-per-node",
        "1",
        "--delay-ms",
        "1",
        "--prompts-per-node",
        "2",
        "--max-tokens",
        "4",
        "--run-dir",
        str(run_dir),
        *ports(),
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 0, err
    assert "== node0 (" in out
    assert "== node1 (" in out
    assert len(re.findall(r" → ", out)) == 4  # two answers per node
    round1, moved, round2 = (
        re.split(r"\nre-placement from round 1's activations: ", out)[0],
        *out.split("re-placement from round 1's activations: ")[1].split("\n", 1),
    )
    assert moved.startswith("epoch 2 applied"), moved
    first, second = table_rows(round1), table_rows(round2)
    assert set(first) == set(second) == {"node0", "node1"}
    for node in first:
        assert first[node][2] == second[node][2] == "2", (first, second)  # both requests answered, twice
        assert float(first[node][5]) > 0  # tokens/s
        # One host per node holding half the experts: some calls are local, some crossed the hub.
        assert 0 < int(first[node][6].rstrip("%")) < 100, first[node]
        # Each host has room for the whole model, so the re-placement makes every call local.
        assert second[node][6] == "100%", second[node]
    assert "everything is stopped" in err
    pids = json.loads((run_dir / "stack.json").read_text())["pids"]
    assert not [name for name, pid in pids.items() if alive(pid)]


def table_rows(text: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in text.splitlines() if re.match(r"node\d +\S+ +\d", line)}


def test_demo_without_the_model_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = prism_in_process(capsys, "demo", "--model", str(tmp_path / "nothing"))
    assert code == 1
    assert err.startswith(f"prism: error: the demo model is not at {tmp_path / 'nothing'} (no config.json)")


def test_prompts_come_from_the_workloads_per_domain(repo_root: Path) -> None:
    chosen = pick_prompts(["a", "b", "c"], 3)
    domains = sorted(p.stem for p in (repo_root / "workloads" / "prompts").glob("*.json"))
    assert [chosen[n][0] for n in "abc"] == domains[:3]
    first = json.loads((repo_root / "workloads" / "prompts" / f"{domains[0]}.json").read_text())["prompts"]
    assert chosen["a"][1] == [p["text"] for p in first[:3]]


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile([3.0], 99) == 3.0


def test_summary_table_shares() -> None:
    run = NodeRun("n0", "c", latencies_s=[0.1, 0.3], tokens=8, wall_s=0.5, own_calls=3, all_calls=4)
    tally = ActivationTally()
    tally.counts = {"n0": {(0, 0): 6, (0, 1): 2}}
    table = summary_table([run], tally, {"h0": [(0, 0)], "h1": [(0, 1)]}, {"h0": "n0", "h1": "n1"})
    row = next(line for line in table.splitlines() if line.startswith("n0"))
    assert row.split() == ["n0", "c", "2", "100", "300", "16.0", "75%", "of", "4", "75%"]
