"""`prism sim` end to end through the CLI entry point (small scenarios)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.main import build_parser
from services.placement.synthetic import PRESETS, Traffic, generate


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    args = build_parser().parse_args(["sim", *argv])
    code = args.func(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_testbed_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "--scenario", "testbed-mixtral", "--requests", "6",
                        "--policies", "uniform,optimal", "--json")
    assert code == 0
    (scenario,) = json.loads(out)["scenarios"]
    assert scenario["name"] == "testbed-mixtral-8x7b-rtt-b8"
    uni, opt = scenario["runs"]
    assert (uni["policy"], opt["policy"]) == ("uniform", "optimal")
    for run in (uni, opt):
        assert run["requests"] == 18
        assert run["mean_latency_s"] > 0
        assert run["p99_latency_s"] >= run["mean_latency_s"]
        assert run["bytes_across"] > 0
        assert run["messages"] > 0
    # the exact proxy optimum never has more remote calls on the statistics it was solved for
    assert opt["proxy_objective"] <= uni["proxy_objective"]


def test_table_and_trace_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    trace = generate(PRESETS["deepseek-v2-lite"], Traffic.dedicated(3, 3, 4, tokens_per_request=(4, 8)), seed=1)
    trace.save(tmp_path / "t.npz")
    code, out, _ = _run(capsys, "--scenario", "testbed-deepseek", "--trace", str(tmp_path / "t.npz"),
                        "--policies", "eplb,prism")
    assert code == 0
    assert "trace-deepseek-v2-lite-rtt-b8" in out
    lines = [line.split() for line in out.splitlines() if line.startswith(("eplb", "prism"))]
    assert [x[0] for x in lines] == ["eplb", "prism"]


def test_shift_reports_both_phases(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "--scenario", "shift", "--requests", "8", "--policies", "prism", "--json")
    assert code == 0
    (run,) = json.loads(out)["scenarios"][0]["runs"]
    assert run["requests"] == 3 * 16
    assert run["mean_latency_before_shift_s"] > 0
    assert run["mean_latency_after_shift_s"] > 0
    assert isinstance(run["log"], list)


def test_sweep_point(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "--scenario", "sweep", "--gpus", "4", "--mbit", "100,1000", "--requests", "3",
                        "--policies", "uniform", "--json")
    assert code == 0
    names = [s["name"] for s in json.loads(out)["scenarios"]]
    assert names == ["sweep-4gpu-100mbit", "sweep-4gpu-1000mbit"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--scenario", "moon"], "unknown scenario"),
        (["--scenario", "testbed-mixtral", "--policies", "best"], "unknown placement policy"),
        (["--scenario", "sweep", "--trace", "x.npz"], "--trace works with"),
        (["--scenario", "testbed-deepseek", "--trace", "/nonexistent.npz"], "no trace file"),
        (["--scenario", "sweep", "--gpus", "4,x"], "--gpus must be"),
        (["--scenario", "testbed-mixtral", "--regime", "fast"], "unknown regime"),
    ],
)
def test_errors(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert message in err
    assert err.startswith("prism sim: error:")
