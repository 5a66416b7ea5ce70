"""Workloads for demos and benchmarks: per-domain prompt sets and named per-node scenarios.

Files (under ``workloads/`` at the repository root, or any directory given to `Workloads.load`):

- ``prompts/<domain>.json``: ``{"domain", "prompts": [{"text", "tokens", "source"}, ...]}``, prompts
  of 20-60 tokens cut from the demo corpus's held-out split (``tools/make_workloads.py``);
- ``scenarios.json``: ``{"version": 1, "defaults": {"max_tokens", "rate_rps"}, "scenarios": {name:
  {"description", "max_tokens"?, "rate_rps"?, "nodes": [{"name", "rate_rps"?, "phases": [{"mix":
  {domain: weight}, "requests"?: n}, ...]}]}}}``. A node runs its phases in order; each phase but
  the last lasts ``requests`` requests of that node (a timed switch of domain mix), the last one
  lasts for ever.

`Workloads.requests(name, per_node, seed)` draws a reproducible request sequence: for every node,
its domains from the phase mixes and its prompts uniformly from the domain's set, with Poisson
arrivals at the node's rate; the nodes' sequences are merged by arrival time. Each node has its
own random stream, so one node's draws do not depend on the others' counts.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import PrismError

DEFAULT_ROOT = Path(__file__).resolve().parents[1] / "workloads"


class WorkloadError(PrismError):
    """A workload file is missing or malformed, or a scenario or domain name is unknown."""

    code = "invalid_workload"
    status = 400


@dataclass(frozen=True)
class Prompt:
    """One prompt: its domain, its index in the domain's set, text and token count."""

    domain: str
    index: int
    text: str
    tokens: int
    source: str


@dataclass(frozen=True)
class Phase:
    """A domain mix (weights > 0, summing to 1) that lasts `requests` requests (None: for ever)."""

    mix: tuple[tuple[str, float], ...]
    requests: int | None


@dataclass(frozen=True)
class NodeWorkload:
    """One node's request stream: its phases and its arrival rate (requests per second)."""

    name: str
    phases: tuple[Phase, ...]
    rate_rps: float

    def phase_at(self, index: int) -> Phase:
        """The phase that the node's request number `index` (0-based) falls in."""
        start = 0
        for phase in self.phases:
            if phase.requests is None or index < start + phase.requests:
                return phase
            start += phase.requests
        return self.phases[-1]


@dataclass(frozen=True)
class Scenario:
    """A named workload: one NodeWorkload per node and the generation length of its requests."""

    name: str
    description: str
    nodes: tuple[NodeWorkload, ...]
    max_tokens: int

    @property
    def node_names(self) -> tuple[str, ...]:
        return tuple(node.name for node in self.nodes)

    @property
    def domains(self) -> tuple[str, ...]:
        """Domains used by any phase of any node, sorted."""
        return tuple(sorted({d for n in self.nodes for p in n.phases for d, _ in p.mix}))


@dataclass(frozen=True)
class Request:
    """One drawn request. `index` counts the node's own requests; `arrival_s` is seconds from start."""

    node: int
    node_name: str
    index: int
    domain: str
    prompt: Prompt
    max_tokens: int
    arrival_s: float


def _fail(where: str, what: str) -> WorkloadError:
    return WorkloadError(f"{where}: {what}")


def _positive_number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise _fail(where, f"must be a number > 0, got {value!r}")
    return float(value)


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(where, f"must be an integer >= 1, got {value!r}")
    return value


def _parse_phase(data: Any, where: str, domains: Sequence[str], last: bool) -> Phase:
    if not isinstance(data, dict) or not isinstance(data.get("mix"), dict) or not data["mix"]:
        raise _fail(where, 'a phase is {"mix": {domain: weight, ...}, "requests": n}')
    unknown = sorted(set(data["mix"]) - set(domains))
    if unknown:
        raise _fail(where, f"unknown domains {unknown}; known: {list(domains)}")
    weights = {str(d): _positive_number(w, f"{where}.mix.{d}") for d, w in data["mix"].items()}
    total = sum(weights.values())
    mix = tuple((d, weights[d] / total) for d in sorted(weights))
    if "requests" not in data or data["requests"] is None:
        if not last:
            raise _fail(where, "every phase but the last needs 'requests' (how long it lasts)")
        return Phase(mix, None)
    return Phase(mix, _positive_int(data["requests"], f"{where}.requests"))


def _parse_node(data: Any, where: str, domains: Sequence[str], rate: float) -> NodeWorkload:
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        raise _fail(where, 'a node is {"name": str, "phases": [...], "rate_rps"?: number}')
    phases = data.get("phases")
    if not isinstance(phases, list) or not phases:
        raise _fail(where, "'phases' must be a non-empty list")
    parsed = tuple(
        _parse_phase(p, f"{where}.phases[{i}]", domains, i == len(phases) - 1) for i, p in enumerate(phases)
    )
    node_rate = _positive_number(data["rate_rps"], f"{where}.rate_rps") if "rate_rps" in data else rate
    return NodeWorkload(data["name"], parsed, node_rate)


def _parse_scenario(name: str, data: Any, defaults: Mapping[str, Any], domains: Sequence[str]) -> Scenario:
    where = f"scenarios.json: scenario {name!r}"
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list) or not data["nodes"]:
        raise _fail(where, '{"description": str, "nodes": [...]} with at least one node')
    rate = _positive_number(data.get("rate_rps", defaults.get("rate_rps", 1.0)), f"{where}.rate_rps")
    max_tokens = _positive_int(data.get("max_tokens", defaults.get("max_tokens", 32)), f"{where}.max_tokens")
    nodes = tuple(_parse_node(n, f"{where}.nodes[{i}]", domains, rate) for i, n in enumerate(data["nodes"]))
    if len({n.name for n in nodes}) != len(nodes):
        raise _fail(where, "node names must be unique")
    return Scenario(name, str(data.get("description", "")), nodes, max_tokens)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise WorkloadError(f"no workload file {path}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WorkloadError(f"cannot read {path}: {exc}") from exc


def _load_prompts(path: Path) -> tuple[Prompt, ...]:
    data = _read_json(path)
    domain = path.stem
    if not isinstance(data, dict) or data.get("domain") != domain or not isinstance(data.get("prompts"), list):
        raise _fail(str(path), f'expected {{"domain": "{domain}", "prompts": [...]}}')
    prompts = []
    for i, p in enumerate(data["prompts"]):
        if not isinstance(p, dict) or not isinstance(p.get("text"), str) or not p["text"]:
            raise _fail(f"{path} prompt {i}", 'expected {"text": non-empty str, "tokens": int, "source": str}')
        tokens = _positive_int(p.get("tokens"), f"{path} prompt {i}.tokens")
        prompts.append(Prompt(domain, i, p["text"], tokens, str(p.get("source", ""))))
    if not prompts:
        raise _fail(str(path), "holds no prompts")
    return tuple(prompts)


class Workloads:
    """The prompt sets and scenarios of one workloads directory."""

    def __init__(self, prompts: Mapping[str, tuple[Prompt, ...]], scenarios: Mapping[str, Scenario]) -> None:
        self._prompts = dict(prompts)
        self._scenarios = dict(scenarios)

    @classmethod
    def load(cls, root: str | Path | None = None) -> Workloads:
        """Read `root` (default: the repository's workloads/); raises WorkloadError when malformed."""
        directory = DEFAULT_ROOT if root is None else Path(root)
        files = sorted((directory / "prompts").glob("*.json"))
        if not files:
            raise WorkloadError(f"no prompt sets (prompts/<domain>.json) under {directory}")
        prompts = {f.stem: _load_prompts(f) for f in files}
        data = _read_json(directory / "scenarios.json")
        if not isinstance(data, dict) or data.get("version") != 1 or not isinstance(data.get("scenarios"), dict):
            raise WorkloadError(f'{directory / "scenarios.json"}: expected {{"version": 1, "scenarios": {{...}}}}')
        defaults = data.get("defaults", {})
        if not isinstance(defaults, dict):
            raise WorkloadError(f'{directory / "scenarios.json"}: "defaults" must be an object')
        scenarios = {
            str(name): _parse_scenario(str(name), body, defaults, sorted(prompts))
            for name, body in data["scenarios"].items()
        }
        return cls(prompts, scenarios)

    @property
    def domains(self) -> tuple[str, ...]:
        """Domains with a prompt set, sorted."""
        return tuple(sorted(self._prompts))

    @property
    def scenario_names(self) -> tuple[str, ...]:
        return tuple(self._scenarios)

    def prompts(self, domain: str) -> tuple[Prompt, ...]:
        if domain not in self._prompts:
            raise WorkloadError(f"unknown domain {domain!r}; known: {list(self.domains)}")
        return self._prompts[domain]

    def scenario(self, name: str) -> Scenario:
        if name not in self._scenarios:
            raise WorkloadError(f"unknown scenario {name!r}; known: {list(self._scenarios)}")
        return self._scenarios[name]

    def requests(self, name: str, per_node: int, seed: int = 0) -> list[Request]:
        """`per_node` requests for every node of scenario `name`, merged by arrival time.

        Ties in arrival time are broken by node index. Same (scenario, per_node, seed) gives the
        same list; a node's first n requests do not depend on per_node beyond n.
        """
        if isinstance(per_node, bool) or not isinstance(per_node, int) or per_node < 0:
            raise WorkloadError(f"per_node must be an integer >= 0, got {per_node!r}")
        scenario = self.scenario(name)
        drawn = [r for i in range(len(scenario.nodes)) for r in self._node_requests(scenario, i, per_node, seed)]
        return sorted(drawn, key=lambda r: (r.arrival_s, r.node, r.index))

    def _node_requests(self, scenario: Scenario, node: int, count: int, seed: int) -> list[Request]:
        workload = scenario.nodes[node]
        # A string seed is hashed with SHA-512 by `random`: stable across runs and Python versions.
        rng = random.Random(f"{seed}:{scenario.name}:{workload.name}")
        clock, out = 0.0, []
        for index in range(count):
            clock += rng.expovariate(workload.rate_rps)
            domains, weights = zip(*workload.phase_at(index).mix, strict=True)
            domain = rng.choices(domains, weights=weights)[0]
            prompt = rng.choice(self.prompts(domain))
            out.append(Request(node, workload.name, index, domain, prompt, scenario.max_tokens, clock))
        return out
