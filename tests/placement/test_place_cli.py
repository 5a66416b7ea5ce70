"""`prism place`: JSON against an independently computed optimum and one error in a subprocess (the
real entry point); the table, topology files, heatmap and the other errors in-process through
`cli.main.main` (a subprocess costs ~1 s of imports each)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, milp

from cli.main import main

ENTRY = "from cli.main import main; main()"
ROOT = Path(__file__).resolve().parents[2]


def place_subprocess(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", ENTRY, "place", *args], capture_output=True, text=True, cwd=ROOT, check=False
    )


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def place(capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """Run `prism place ARGS` in-process through the CLI's own `main`."""

    def run(*args: str) -> Result:
        with pytest.raises(SystemExit) as done:
            main(["place", *args])
        out = capsys.readouterr()
        return Result(int(done.value.code or 0), out.out, out.err)

    return run


def independent_optimum(f: np.ndarray, slots: list[int]) -> float:
    """The proxy optimum as a MILP with explicit integrality (not the LP `optimal` solves)."""
    n, cells = f.shape[0], f.shape[1] * f.shape[2]
    x = np.arange(n * cells)
    cap = sp.coo_matrix((np.ones(x.size), (x // cells, x)), shape=(n, x.size))
    cov = sp.coo_matrix((np.ones(x.size), (x % cells, x)), shape=(cells, x.size))
    res = milp(
        -f.reshape(-1),
        constraints=[LinearConstraint(cap, -np.inf, slots), LinearConstraint(cov, 1, np.inf)],
        integrality=np.ones(x.size),
        bounds=Bounds(0, 1),
    )
    assert res.status == 0
    return float(f.sum() + res.fun)


@pytest.fixture
def counts(tmp_path: Path) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(7)
    f = rng.poisson(rng.gamma(0.5, size=(3, 4, 8)) * 20).astype(float)
    path = tmp_path / "counts.npy"
    np.save(path, f)
    return path, f


def test_json_optimal_matches_an_independent_optimum(counts: tuple[Path, np.ndarray]) -> None:
    path, f = counts
    out = place_subprocess("--counts", str(path), "--slots", "8,8,16", "--policy", "optimal", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["objective"] == pytest.approx(independent_optimum(f, [8, 8, 16]), abs=1e-6)
    view = np.zeros(f.shape, dtype=bool)
    for n, layer, e in doc["placement"]:
        view[n, layer, e] = True
    assert view.any(axis=0).all(), "an expert has no replica"
    assert (view.sum(axis=(1, 2)) <= [8, 8, 16]).all()
    assert doc["objective"] == pytest.approx(float(f[~view].sum()))
    assert [row["used"] for row in doc["nodes"]] == view.sum(axis=(1, 2)).tolist()


def test_table_lists_every_node(place: Callable[..., Result], counts: tuple[Path, np.ndarray]) -> None:
    path, _ = counts
    out = place("--counts", str(path), "--slots", "12,12,12", "--policy", "prism")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("policy prism: proxy objective")
    assert [line.split()[:3] for line in lines[2:]] == [["0", "12", "12"], ["1", "12", "12"], ["2", "12", "12"]]


TOPOLOGY_TOML = """
expert_mb = 10
[link_defaults]
rtt_ms = 4
rate_mbit = 500
[[nodes]]
name = "a"
hosts = [{ slots = 10 }]
[[nodes]]
name = "b"
hosts = [{ memory_gb = 0.1, speed = 2.0 }]   # 102.4 MB / 10 MB → 10 slots
[[nodes]]
name = "c"
hosts = [{ slots = 6 }, { slots = 6, speed = 0.5 }]
[[links]]
nodes = ["a", 2]
rtt_ms = 20
rate_mbit = 100
"""


@pytest.mark.parametrize("policy", ["eplb", "latency"])
def test_topology_toml_and_json(
    place: Callable[..., Result], tmp_path: Path, counts: tuple[Path, np.ndarray], policy: str
) -> None:
    import tomllib

    path, _ = counts
    toml_path = tmp_path / "topo.toml"
    toml_path.write_text(TOPOLOGY_TOML)
    json_path = tmp_path / "topo.json"
    json_path.write_text(json.dumps(tomllib.loads(TOPOLOGY_TOML)))
    docs = []
    for topo in (toml_path, json_path):
        out = place("--counts", str(path), "--topology", str(topo), "--policy", policy, "--json")
        assert out.returncode == 0, out.stderr
        docs.append(json.loads(out.stdout))
    assert docs[0]["placement"] == docs[1]["placement"]
    assert [row["slots"] for row in docs[0]["nodes"]] == [10, 10, 12]
    per_host = np.bincount([h for h, _, _ in docs[0]["host_placement"]], minlength=4)
    assert (per_host <= [10, 10, 6, 6]).all()


def test_plot_writes_a_png(place: Callable[..., Result], tmp_path: Path, counts: tuple[Path, np.ndarray]) -> None:
    path, _ = counts
    png = tmp_path / "p.png"
    out = place("--counts", str(path), "--slots", "12,12,12", "--policy", "optimal", "--plot", str(png))
    assert out.returncode == 0, out.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = place("--counts", str(path), "--slots", "12,12,12", "--policy", "optimal", "--plot", str(tmp_path / "p.txt"))
    assert out.returncode == 2  # an image format matplotlib does not know: one line, no traceback
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"prism place: error: cannot write {tmp_path / 'p.txt'}: Format 'txt' is not supported")


@pytest.mark.parametrize(
    ("array", "slots", "message"),
    [
        (np.ones((3, 4)), "8,8,16", "shape [nodes, layers, experts]"),
        (-np.ones((3, 4, 8)), "8,8,16", "counts must be >= 0"),
        (np.full((3, 4, 8), np.nan), "8,8,16", "NaN"),
        (np.ones((3, 4, 8)), "8,8", "3 nodes but the cluster has 2"),
        (np.ones((3, 4, 8)), "8,8,8", "24 slots in total cannot hold 32 experts"),
        (np.ones((3, 4, 8)), "8,x,8", "comma-separated integers"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    place: Callable[..., Result], tmp_path: Path, array: np.ndarray, slots: str, message: str
) -> None:
    path = tmp_path / "bad.npy"
    np.save(path, array)
    out = place("--counts", str(path), "--slots", slots, "--policy", "optimal")
    assert out.returncode == 2
    assert out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert message in out.stderr


def test_unknown_policy_in_a_subprocess(counts: tuple[Path, np.ndarray]) -> None:
    path, _ = counts
    out = place_subprocess("--counts", str(path), "--slots", "8,8,16", "--policy", "fastest")
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.strip() == (
        "prism place: error: unknown placement policy 'fastest'; "
        "accepted: uniform, redundance, eplb, prism, optimal, latency, pipeline, route"
    )


def test_unknown_policy_and_missing_file(
    place: Callable[..., Result], tmp_path: Path, counts: tuple[Path, np.ndarray]
) -> None:
    path, _ = counts
    out = place("--counts", str(path), "--slots", "8,8,16", "--policy", "fastest")
    assert out.returncode == 2
    assert "accepted: uniform, redundance, eplb, prism, optimal, latency" in out.stderr
    out = place("--counts", str(tmp_path / "none.npy"), "--slots", "8,8,16", "--policy", "uniform")
    assert out.returncode == 2
    assert "cannot read counts" in out.stderr
    bad_topo = tmp_path / "t.toml"
    bad_topo.write_text('[[nodes]]\nhosts = [{ slots = 40, colour = "red" }]\n')
    out = place("--counts", str(path), "--topology", str(bad_topo), "--policy", "uniform")
    assert out.returncode == 2
    assert "unknown keys ['colour']" in out.stderr


def test_prism_up_topology_end_to_end(place: Callable[..., Result], tmp_path: Path) -> None:
    """topologies/demo.toml: edge-a has two hosts, edge-b one, each 52 demo experts (11 MiB at float32)."""
    rng = np.random.default_rng(3)
    f = rng.poisson(rng.gamma(0.5, size=(2, 4, 32)) * 20).astype(float)  # the demo model's 4 × 32 experts
    path = tmp_path / "f.npy"
    np.save(path, f)
    out = place("--counts", str(path), "--topology", str(ROOT / "topologies" / "demo.toml"), "--policy", "prism",
                "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert [row["slots"] for row in doc["nodes"]] == [104, 52]
    view = np.zeros(f.shape, dtype=bool)
    for n, layer, e in doc["placement"]:
        view[n, layer, e] = True
    assert view.any(axis=0).all(), "an expert has no replica"
    assert (np.bincount([h for h, _, _ in doc["host_placement"]], minlength=3) <= 52).all()


def test_prism_up_topology_with_the_latency_policy_and_other_counts(
    place: Callable[..., Result], counts: tuple[Path, np.ndarray]
) -> None:
    """The reported command; counts of another shape than the model's (3 × 4 × 8) are fine: only the
    expert size comes from the model."""
    path, _ = counts
    out = place("--counts", str(path), "--topology", str(ROOT / "topologies" / "three-edge.toml"), "--policy",
                "latency", "--json")
    assert out.returncode == 0, out.stderr
    assert [row["slots"] for row in json.loads(out.stdout)["nodes"]] == [2427, 2427, 4854]


def test_prism_up_topology_errors_are_one_line(
    place: Callable[..., Result], tmp_path: Path, counts: tuple[Path, np.ndarray]
) -> None:
    path, _ = counts
    topo = ROOT / "topologies" / "three-edge.toml"
    out = place("--counts", str(path), "--topology", str(topo), "--model", str(tmp_path), "--policy", "prism")
    assert out.returncode == 2
    assert out.stderr.strip() == f"prism place: error: invalid model directory {tmp_path}: no config.json in {tmp_path}"
    bad = tmp_path / "bad.toml"
    bad.write_text('dtype = "float32"\n[[nodes]]\nname = "a"\nhosts = [{ name = "h", memory_mb = -1 }]\n')
    out = place("--counts", str(path), "--topology", str(bad), "--policy", "prism")
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "memory_mb" in out.stderr


def test_help_says_which_formats_and_which_model(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["place", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "or a `prism up` one (see topologies/)" in text
    assert "--model MODEL checkpoint directory whose expert size" in text
    assert "(default: the demo model)" in text


def test_plot_without_matplotlib_is_one_line(
    place: Callable[..., Result], tmp_path: Path, counts: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`./prism` installs no plot extra; --plot then says what to install instead of a traceback."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` meets when it is absent
    path, _ = counts
    out = place("--counts", str(path), "--slots", "12,12,12", "--policy", "optimal", "--plot", str(tmp_path / "p.png"))
    assert out.returncode == 2
    assert out.stderr.strip() == ("prism place: error: --plot needs matplotlib, from the `plot` extra: ./run-tests "
                                  "installs it, or .venv/bin/pip install -e '.[plot]'")
    assert not (tmp_path / "p.png").exists()


def test_a_closed_pipe_ends_quietly(tmp_path: Path, repo_root: Path) -> None:
    """`prism place --json | head -c 1` with more output than a pipe holds: no BrokenPipeError traceback."""
    path = tmp_path / "big.npy"
    np.save(path, np.random.default_rng(0).random((4, 32, 128)))
    place = f"{sys.executable} -c '{ENTRY}' place --counts {path} --slots 1024,1024,1024,1024 --policy uniform --json"
    done = subprocess.run(["bash", "-c", f"{place} | head -c 1"], capture_output=True, text=True, cwd=repo_root,
                          timeout=120, check=False)
    assert done.stdout == "{"
    assert "Traceback" not in done.stderr
    assert "BrokenPipeError" not in done.stderr
