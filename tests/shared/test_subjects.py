from __future__ import annotations

import pytest

from shared import subjects


def test_subjects_follow_the_contract() -> None:
    assert subjects.infer("edge-1") == "prism.v1.infer.edge-1"
    assert subjects.expert(3, 17) == "prism.v1.expert.3.17"
    assert subjects.parse_expert(subjects.expert(3, 17)) == (3, 17)
    assert subjects.mqtt_infer_topic("dev1") == "prism/v1/infer/dev1"
    assert subjects.host_status("h0") == "prism.v1.host.h0.status"


@pytest.mark.parametrize("bad", ["", "a.b", "*", ">", "a b", "x" * 65])
def test_tokens_cannot_inject_levels_or_wildcards(bad: str) -> None:
    with pytest.raises(ValueError, match="not a valid name"):
        subjects.infer(bad)
