"""The inference request contract: valid requests parse, bad ones say what is wrong."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from shared.errors import BadRequest, InvalidJSON
from shared.schemas import HostStatus, parse_host_command, parse_request, reply_hints


def test_minimal_requests() -> None:
    assert parse_request(b'{"prompt": "hi"}').max_tokens == 64
    request = parse_request(json.dumps({"input_ids": [1, 2], "temperature": 0.7, "seed": 3}).encode())
    assert request.input_ids == [1, 2]
    assert request.seed == 3


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        (b"{not json", InvalidJSON, "not valid JSON"),
        (b"[1, 2]", BadRequest, "JSON object"),  # valid JSON, not a request: invalid_request
        (b"\xff\xfe", InvalidJSON, "not valid JSON"),
        # json.loads raises neither JSONDecodeError for these: too deep, and an integer too long to read
        (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", InvalidJSON, "not valid JSON: maximum recursion"),
        (b'{"input_ids": [' + b"9" * 5000 + b"]}", InvalidJSON, "not valid JSON: Exceeds the limit"),
        (b"{}", BadRequest, "exactly one of 'prompt'"),
        (b'{"prompt": "a", "input_ids": [1]}', BadRequest, "exactly one of 'prompt'"),
        (b'{"prompt": "a", "max_tokens": 0}', BadRequest, "max_tokens: Input should be greater than or equal to 1"),
        (b'{"prompt": "a", "max_tokens": 5000}', BadRequest, "max_tokens: Input should be less than or equal"),
        (b'{"prompt": "a", "temperature": -1}', BadRequest, "temperature"),
        (b'{"prompt": "a", "top_p": 0}', BadRequest, "top_p"),
        (b'{"prompt": "a", "top_p": 1.5}', BadRequest, "top_p"),
        (b'{"input_ids": []}', BadRequest, "input_ids"),
        (b'{"input_ids": ["a"]}', BadRequest, "input_ids.0"),
        (b'{"prompt": "a", "colour": "red"}', BadRequest, "colour: Extra inputs are not permitted"),
        (b'{"prompt": "a", "client_id": "a/b"}', BadRequest, "client_id"),
        # no guessing at types: a string, a bool or a float where an integer belongs is a client bug
        (b'{"prompt": "a", "max_tokens": "5"}', BadRequest, "max_tokens: Input should be a valid integer"),
        (b'{"prompt": "a", "max_tokens": true}', BadRequest, "max_tokens: Input should be a valid integer"),
        (b'{"input_ids": [1.0]}', BadRequest, "input_ids.0"),
        (b'{"prompt": "a", "stream": "yes"}', BadRequest, "stream: Input should be a valid boolean"),
        (b'{"prompt": "a", "temperature": NaN}', BadRequest, "temperature: Input should be a finite number"),
        (b'{"prompt": "a", "top_p": Infinity}', BadRequest, "top_p: Input should be a finite number"),
    ],
)
def test_bad_requests(body: bytes, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message) as raised:
        parse_request(body)
    assert type(raised.value) is error  # InvalidJSON is a BadRequest: the code must be the exact one


def test_error_reply_finds_id_and_mqtt_client_when_it_can() -> None:
    assert reply_hints(b'{"id": "abc", "max_tokens": -1, "client_id": "dev-1"}') == ("abc", "dev-1")
    assert reply_hints(b'{"client_id": "a/b", "id": 5}') == (None, None)  # not a subject token, not a string
    assert reply_hints(b"{broken") == (None, None)
    assert reply_hints(b"[" * 100_000) == (None, None)


def test_host_names_must_be_subject_tokens() -> None:
    """A heartbeat naming host "a.b" would make gatings and the migrator address a bad subject."""
    status = {"host": "a.b", "node": "n", "device": "cpu", "memory_used_bytes": 0, "memory_limit_bytes": 1,
              "experts": [], "queue_depth": 0, "calls_served": 0, "tokens_served": 0, "errors": 0}
    with pytest.raises(ValueError, match="host"):
        HostStatus.model_validate(status)
    assert HostStatus.model_validate({**status, "host": "a-b_1"}).host == "a-b_1"


@pytest.mark.parametrize(("payload", "error"), [(b"{nope", InvalidJSON), (b"[1]", BadRequest),
                                               (b'{"kind": "dance"}', BadRequest)])
def test_host_commands_that_are_not_json_are_invalid_json_as_everywhere(payload: bytes, error: type) -> None:
    with pytest.raises(error) as raised:
        parse_host_command(payload)
    assert type(raised.value) is error  # invalid_json, not invalid_request, for what is not JSON


def test_errors_defined_anywhere_are_rebuilt_from_their_headers() -> None:
    """Subclasses outside shared/errors.py (weights, workloads, migrator) came back as `internal`."""
    from services.migrator.service import MigrationFailed
    from services.placement.service import PlanFailed
    from shared.errors import error_from_headers
    from shared.weights import WeightsError

    for cls in (WeightsError, MigrationFailed, PlanFailed, InvalidJSON, BadRequest):
        rebuilt = error_from_headers(cls("what went wrong").headers())
        assert type(rebuilt) is cls
        assert rebuilt.message == "what went wrong"


def _status(experts: object) -> HostStatus:
    return HostStatus(host="edge-b-gpu0", node="edge-b", device="cpu", memory_used_bytes=0, memory_limit_bytes=1,
                      experts=experts, queue_depth=0, calls_served=0, tokens_served=0, errors=0)


def test_a_heartbeat_names_its_experts_as_a_hex_mask_per_layer() -> None:
    status = _status([[3, 9], (0, 0), [3, 0], [3, 9]])
    assert status.experts == ((0, 0), (3, 0), (3, 9)), "ascending, once each"
    wire = json.loads(status.model_dump_json())
    assert wire["experts"] == {"0": "1", "3": "201"}  # bits 0 and 9 of layer 3
    assert HostStatus.model_validate_json(status.model_dump_json()) == status
    assert _status(wire["experts"]).experts == status.experts
    assert _status({}).experts == () == _status([]).experts


def test_a_repeated_heartbeat_gives_the_same_tuple_so_a_gating_sees_nothing_moved_at_once() -> None:
    experts = tuple((layer, e) for layer in range(58) for e in range(0, 256, 3))
    payload = _status(experts).model_dump_json()
    first, again = HostStatus.model_validate_json(payload), HostStatus.model_validate_json(payload)
    assert first.experts == experts
    assert again.experts is first.experts


@pytest.mark.parametrize(
    "experts",
    [{"1": "xyz"}, {"1": "-5"}, {"1": "0x5"}, {"1": ""}, {"1": "f" * 1025}, {"1": 5}, {"1": ["5"]}, {"a": "1"},
     {"-1": "1"}, [[1, -1]], [[True, 1]], [[1.0, 2]], [[1, 2, 3]], [1, 2], "0:1", None],
)
def test_bad_experts_in_a_heartbeat_are_refused(experts: object) -> None:
    with pytest.raises(ValidationError, match="experts"):
        _status(experts)
