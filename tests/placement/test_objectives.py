"""The migration rule judges a proposal by what its policy minimises (services.placement.objectives)."""

from __future__ import annotations

from typing import get_args

import numpy as np
import pytest

from services.placement import Cluster, Placement, PolicyName, Workload, proxy_objective
from services.placement.objectives import Verdict, busiest_host_calls, judge
from services.placement.policies import get_policy

# 2 nodes, one host each with 3 slots; 1 layer × 4 experts. Node 0 calls experts 0 and 1 a lot,
# node 1 calls experts 2 and 3 a little.
FREQ = np.array([[[90.0, 90.0, 0.0, 0.0]], [[0.0, 0.0, 10.0, 10.0]]])
CLUSTER = Cluster.from_slots([3, 3])
LOCAL = Placement(np.array([[[1, 1, 0, 0]], [[0, 0, 1, 1]]], dtype=bool))  # each node's experts at home
SPREAD = Placement(np.array([[[1, 0, 1, 0]], [[0, 1, 0, 1]]], dtype=bool))  # node 0's load on both hosts


def verdict(policy: PolicyName, current: Placement, proposed: Placement, migration_cost_calls: float = 0.0) -> Verdict:
    return judge(policy, FREQ, current, proposed, CLUSTER, coact=None, workload=Workload.uniform(2),
                 migration_cost_calls=migration_cost_calls)


def test_busiest_host_calls_by_hand() -> None:
    assert busiest_host_calls(FREQ, LOCAL, CLUSTER) == 180.0  # host 0 serves 90 + 90
    assert busiest_host_calls(FREQ, SPREAD, CLUSTER) == 100.0  # 90 + 10 on each
    both = Placement(np.array([[[1, 1, 1, 0]], [[1, 1, 0, 1]]], dtype=bool))  # 0 and 1 on both hosts
    assert busiest_host_calls(FREQ, both, CLUSTER) == 100.0  # 45 + 45 + 10 each
    slow = Cluster.from_slots([3, 3], speed=[1.0, 0.5])
    assert busiest_host_calls(FREQ, SPREAD, slow) == 200.0  # host 1: (90 + 10) / 0.5


def test_eplb_moves_to_balance_that_costs_remote_calls() -> None:
    """The case that kept `eplb` from ever moving live: its proposal balances load and raises the
    remote calls, so by the remote-call proxy it never passed."""
    assert proxy_objective(FREQ, SPREAD, CLUSTER) > proxy_objective(FREQ, LOCAL, CLUSTER)
    assert not verdict("prism", LOCAL, SPREAD).accept
    balance = verdict("eplb", LOCAL, SPREAD, migration_cost_calls=10.0)
    assert balance.accept
    assert (balance.before, balance.after, balance.unit) == (180.0, 100.0 + 2 * 10.0, "calls")
    assert not verdict("eplb", LOCAL, SPREAD, migration_cost_calls=40.0).accept  # 2 new replicas cost 80


def test_prism_pays_for_the_replicas_it_adds() -> None:
    assert verdict("prism", SPREAD, LOCAL, migration_cost_calls=10.0).accept  # 100 remote calls → 0 + 2 × 10
    assert not verdict("prism", SPREAD, LOCAL, migration_cost_calls=50.0).accept


@pytest.mark.parametrize("policy", get_args(PolicyName))
def test_the_placement_in_place_is_never_replaced_by_itself(policy: PolicyName) -> None:
    assert not verdict(policy, LOCAL, LOCAL).accept
    assert not verdict(policy, SPREAD, SPREAD).accept


def test_uniform_takes_its_layout_whatever_the_load() -> None:
    layout = get_policy("uniform")(FREQ, CLUSTER)
    assert verdict("uniform", LOCAL, layout).accept != LOCAL.equals(layout)
    assert verdict("uniform", SPREAD, LOCAL).accept


def test_latency_needs_its_min_gain() -> None:
    rtt = Cluster.from_slots([3, 3], rtt_s=0.004)

    def latency_verdict(min_gain: float) -> Verdict:
        workload = Workload.uniform(2, top_k=1, min_gain=min_gain)
        return judge("latency", FREQ, SPREAD, LOCAL, rtt, coact=None, workload=workload, migration_cost_calls=0.0)

    gain = latency_verdict(0.0)
    assert gain.accept  # every call local: no round trip
    assert gain.unit == "s/step"
    share = 1.0 - gain.after / gain.before
    assert latency_verdict(share * 0.9).accept
    assert not latency_verdict(share * 1.1).accept


def test_route_judges_by_the_load_view_it_chooses_by() -> None:
    """`route` proposals are judged by `RouteModel.load_cost` (with step rates: the rehearsal of that
    traffic), not by the step-together cost of `latency`: with a dense part and step rates the two
    differ, and the verdict's numbers are the load view's."""
    from services.placement.route_model import RouteModel

    rtt = Cluster.from_slots([3, 3], rtt_s=0.004)
    workload = Workload.uniform(2, top_k=1, dense_time_s=2e-4, step_rate=np.array([50.0, 50.0]))
    v = judge("route", FREQ, SPREAD, LOCAL, rtt, coact=None, workload=workload, migration_cost_calls=0.0)
    model = RouteModel(rtt, FREQ, None, workload)
    assert (v.before, v.after) == (model.load_cost(SPREAD), model.load_cost(LOCAL))
    assert v.before != model.cost(SPREAD)
    assert v.accept
    assert v.unit == "s/token"  # the rehearsal's measure: a request's seconds per token
