"""The inference request contract: valid requests parse, bad ones say what is wrong."""

from __future__ import annotations

import json

import pytest

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
