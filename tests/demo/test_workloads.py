"""The shipped workloads: prompt sets per domain, scenarios seeded and reproducible, bad files refused."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shared.workloads import Request, WorkloadError, Workloads

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo"


@pytest.fixture(scope="module")
def workloads() -> Workloads:
    return Workloads.load()


def test_every_domain_has_prompts_of_20_to_60_tokens(workloads: Workloads) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    assert workloads.domains == ("c", "prose", "python", "shell")
    for domain in workloads.domains:
        prompts = workloads.prompts(domain)
        assert len(prompts) >= 24
        assert len({p.text for p in prompts}) == len(prompts)
        for p in prompts:
            n = len(tok.encode(p.text, add_special_tokens=False).ids)
            assert n == p.tokens
            assert 20 <= n <= 60


def test_same_seed_same_requests_other_seed_other_requests(workloads: Workloads) -> None:
    def key(requests: list[Request]) -> list[tuple[int, int, str, int, float]]:
        return [(r.node, r.index, r.domain, r.prompt.index, r.arrival_s) for r in requests]

    a = workloads.requests("skewed-3", 30, seed=7)
    b = Workloads.load().requests("skewed-3", 30, seed=7)
    c = workloads.requests("skewed-3", 30, seed=8)
    assert key(a) == key(b)
    assert key(a) != key(c)
    assert len(a) == 90
    assert [r.arrival_s for r in a] == sorted(r.arrival_s for r in a)


def test_a_nodes_first_requests_do_not_depend_on_how_many_are_drawn(workloads: Workloads) -> None:
    short = workloads.requests("mixed-3", 10, seed=3)
    long = workloads.requests("mixed-3", 40, seed=3)
    for node in range(3):
        first = [(r.domain, r.prompt.index) for r in long if r.node == node][:10]
        assert first == [(r.domain, r.prompt.index) for r in short if r.node == node]


def test_switch_changes_each_nodes_domain_after_200_requests(workloads: Workloads) -> None:
    scenario = workloads.scenario("switch-3")
    requests = workloads.requests("switch-3", 260, seed=0)
    expected = {0: ("python", "c"), 1: ("c", "prose"), 2: ("prose", "python")}
    for node, (before, after) in expected.items():
        mine = sorted((r for r in requests if r.node == node), key=lambda r: r.index)
        assert {r.domain for r in mine[:200]} == {before}
        assert {r.domain for r in mine[200:]} == {after}
        assert scenario.nodes[node].phases[0].requests == 200


def test_skewed_mix_is_drawn_in_its_proportions(workloads: Workloads) -> None:
    requests = workloads.requests("skewed-3", 1000, seed=1)
    own = {0: "python", 1: "c", 2: "prose"}
    for node, domain in own.items():
        share = sum(r.domain == domain for r in requests if r.node == node) / 1000
        assert 0.65 < share < 0.75


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "workloads"
    shutil.copytree(Path(__file__).resolve().parents[2] / "workloads", root)
    return root


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s["scenarios"]["dedicated-3"]["nodes"][0]["phases"][0]["mix"].update(cobol=1), "unknown domains"),
        (lambda s: s["scenarios"]["switch-3"]["nodes"][0]["phases"][0].pop("requests"), "needs 'requests'"),
        (lambda s: s["scenarios"]["mixed-3"]["nodes"][1].update(name="node0"), "unique"),
        (lambda s: s["scenarios"]["mixed-3"].update(max_tokens=0), "max_tokens"),
        (lambda s: s.update(version=2), "version"),
    ],
)
def test_malformed_scenarios_are_refused_with_the_reason(
    tmp_path: Path, change: Callable[[dict[str, Any]], object], message: str
) -> None:
    root = _copy(tmp_path)
    data = json.loads((root / "scenarios.json").read_text())
    change(data)
    (root / "scenarios.json").write_text(json.dumps(data))
    with pytest.raises(WorkloadError, match=message):
        Workloads.load(root)


def test_unknown_names_are_refused(workloads: Workloads) -> None:
    with pytest.raises(WorkloadError, match="unknown scenario"):
        workloads.scenario("nope")
    with pytest.raises(WorkloadError, match="unknown domain"):
        workloads.prompts("cobol")
