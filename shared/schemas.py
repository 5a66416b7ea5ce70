"""Messages of the public inference contract and of the control plane (JSON, frozen pydantic models).

Inference request (`prism.v1.infer.<node>`, or MQTT `prism/v1/infer/<node>` with `client_id`):
exactly one of `prompt` / `input_ids`. Replies: `TokenChunk`s while streaming, then one `FinalReply`,
or one `ErrorReply`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from shared.errors import BadRequest, InvalidJSON
from shared.subjects import NAME_PATTERN, is_token

MAX_TOKENS_LIMIT = 4096


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class InferRequest(Message):
    # strict: "5", true or 5.0 for an integer is a client bug to report, not to guess at
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    prompt: str | None = Field(None, min_length=1, description="text to continue")
    input_ids: list[int] | None = Field(None, min_length=1, description="token ids to continue")
    max_tokens: int = Field(64, ge=1, le=MAX_TOKENS_LIMIT, description="tokens to generate")
    temperature: float = Field(0.0, ge=0.0, le=100.0, allow_inf_nan=False, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False, description="nucleus sampling mass")
    seed: int | None = Field(None, ge=0, lt=2**63, description="makes sampling reproducible")
    stream: bool = Field(False, description="send one TokenChunk per generated token")
    id: str | None = Field(None, max_length=128, description="echoed in every reply")
    client_id: str | None = Field(
        None, pattern=NAME_PATTERN, description="MQTT clients: replies go to prism/v1/reply/<client_id>"
    )

    @model_validator(mode="after")
    def _exactly_one_input(self) -> InferRequest:
        if (self.prompt is None) == (self.input_ids is None):
            raise ValueError("give exactly one of 'prompt' (text) or 'input_ids' (list of token ids)")
        return self


class CancelRequest(Message):
    """On `prism.v1.infer.<node>.cancel`: stop the requests whose replies go to `reply_to`."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    reply_to: str = Field(min_length=1, max_length=256, description="the reply subject of the requests to stop")


class GatingLoad(Message):
    """What a gating reports in its `$SRV.STATS` endpoint data: how busy it is, and what it cancelled."""

    node: str
    active: int = Field(description="sequences in the running batch")
    waiting: int = Field(description="sequences queued for a batch slot")
    max_batch: int = Field(description="batch slots (KV cache slots)")
    cancelled: int = Field(description="running or queued requests stopped by a cancel, since start")
    foreign_kv: int = Field(0, description="KV slots held for other nodes' requests whose route runs layers here")
    segments_run: int = Field(0, description="route segments run for other nodes, since start")
    segment_batches: int = Field(0, description="forward passes they took (segments of one range batch together)")
    segment_s: float = Field(0.0, description="seconds those forward passes took (layers, experts, KV), since start")
    hops_sent: int = Field(0, description="chains of this node's requests' layers sent to other nodes, since start")
    restarted_at_home: int = Field(
        0, description="requests started again at home because a node of their route was not serving, since start"
    )
    shared_dispatches: int = Field(
        0, description="MoE-layer dispatches that carried the expert calls of several streams (own step, segments)"
    )
    shared_calls: int = Field(0, description="the streams' calls those dispatches carried, since start")
    route: list[str] = Field(default_factory=list, description="executing node per layer for new requests; [] = home")


class TokenChunk(Message):
    id: str | None
    index: int
    token_id: int
    text: str


class Usage(Message):
    prompt_tokens: int
    completion_tokens: int


class Timings(Message):
    """Seconds spent per phase of one request, measured at the gating service."""

    queue_s: float
    prefill_s: float
    decode_s: float
    expert_wait_s: float = Field(description="in routed-expert calls: local compute plus what remote ones added")
    local_experts_s: float = Field(0.0, description="computing experts held in the gating's own process")
    remote_wait_s: float = Field(0.0, description="waiting on remote experts after the local ones were done")
    hop_wait_s: float = Field(0.0, description="on a route: waiting for other nodes' layers (hops and their segments)")
    total_s: float


class FinalReply(Message):
    id: str | None
    done: Literal[True] = True
    text: str
    token_ids: list[int]
    finish_reason: Literal["length", "stop"]
    usage: Usage
    timings: Timings


class ErrorBody(Message):
    code: str
    message: str


class ErrorReply(Message):
    id: str | None
    done: Literal[True] = True
    error: ErrorBody


def load_json(payload: bytes, what: str = "request") -> Any:
    """`json.loads`, every way a payload can fail to decode an InvalidJSON: besides JSONDecodeError and
    UnicodeDecodeError (both ValueErrors), deep nesting raises RecursionError and an integer of more
    than 4300 digits a plain ValueError."""
    try:
        return json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise InvalidJSON(f"{what} is not valid JSON: {str(exc)[:200]}") from None


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type (what a client sent, not Python's name for it)."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def parse_request(payload: bytes) -> InferRequest:
    """Decode and validate a request, raising BadRequest/InvalidJSON with a readable message."""
    data = load_json(payload)
    if not isinstance(data, dict):
        raise BadRequest(f"request must be a JSON object, got {json_type(data)}")  # valid JSON, wrong shape
    try:
        return InferRequest.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(describe_validation_error(exc)) from None


def parse_cancel(payload: bytes) -> CancelRequest:
    """Decode a cancel (`prism.v1.infer.<node>.cancel`): InvalidJSON or BadRequest as for a request."""
    data = load_json(payload, "cancel")
    if not isinstance(data, dict):
        raise BadRequest(f"cancel must be a JSON object, got {json_type(data)}")
    try:
        return CancelRequest.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem: `max_tokens: Input should be less than or equal to 4096`."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "request"
        message = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


def reply_hints(payload: bytes) -> tuple[str | None, str | None]:
    """Best-effort (`id`, `client_id`) of a request that failed validation, so that the error reply
    can echo the id and reach an MQTT client; None for a field that is missing or not valid itself."""
    try:
        data: Any = load_json(payload)
    except InvalidJSON:
        return None, None
    if not isinstance(data, dict):
        return None, None
    request_id, client_id = data.get("id"), data.get("client_id")
    request_id = request_id if isinstance(request_id, str) and len(request_id) <= 128 else None
    return request_id, client_id if is_token(client_id) else None


# ---- control plane ------------------------------------------------------------------------------


ExpertKeys = tuple[tuple[int, int], ...]
"""(layer, expert) pairs, ascending."""

MAX_MASK_HEX = 1024  # experts per layer a heartbeat can name: 4096
_LAYER = re.compile("[0-9]{1,9}")
_MASK = re.compile(f"[0-9a-fA-F]{{1,{MAX_MASK_HEX}}}")


class HostStatus(Message):
    """Heartbeat of one expert host on `prism.v1.host.<host>.status` (and in KV prism_hosts).

    In JSON, `experts` is one hexadecimal bitmask per layer, `{"<layer>": "<mask>"}` (bit e: expert e),
    where a list of pairs took eight times the bytes and its parsing 1.8 ms of every gating's event loop
    per heartbeat (a DeepSeek-V3 host with 30% of the experts: 4,454 pairs, 38 kB;
    bench/control_messages.py). An unchanged mask parses to the very tuple it gave before, so the
    gatings' directories see at a glance that nothing moved. A list of pairs is still accepted.
    """

    kind: Literal["host_status"] = "host_status"
    host: str = Field(pattern=NAME_PATTERN)  # a subject token: gatings and the migrator address it
    node: str = Field(pattern=NAME_PATTERN)
    device: str
    memory_used_bytes: int
    memory_limit_bytes: int
    experts: ExpertKeys = Field(description="resident (layer, expert) pairs, ascending")
    queue_depth: int
    calls_served: int = Field(description="expert calls answered (one per expert of each message answered)")
    tokens_served: int
    errors: int
    messages_served: int = Field(0, description="data messages answered")
    busy_s: float = Field(0.0, description="seconds spent answering them, from decoding to the reply's send")
    direct_calls: int = Field(0, description="expert calls computed for its own gating (embedded, no message)")
    direct_tokens: int = Field(0, description="rows of those calls")
    direct_s: float = Field(0.0, description="seconds of that compute")
    embedded: bool = Field(False, description="the host lives in its node's gating process")
    speed: float = Field(1.0, gt=0, le=1000, description="relative compute speed (its topology's), 1.0 = reference")
    instance: str = Field("", max_length=64, description="random id of the host process: changes on a restart")

    @field_validator("experts", mode="plain")
    @classmethod
    def _expert_keys(cls, value: Any) -> ExpertKeys:
        if isinstance(value, dict):
            return _unmask(value)
        if isinstance(value, tuple):  # a host's own, the same tuple every heartbeat: checked once
            with contextlib.suppress(TypeError):  # unhashable (lists inside): checked below
                return _checked_pairs(value)
        return _pairs(value)

    @field_serializer("experts", when_used="json")
    def _expert_masks(self, keys: ExpertKeys) -> dict[str, str]:
        return dict(_masks(keys))  # a copy: the one remembered must not change


def _pairs(value: Any) -> ExpertKeys:
    """[layer, expert] pairs, checked, ascending and without repeats."""
    try:
        if isinstance(value, str | bytes | dict):
            raise TypeError
        keys = {(layer, expert) for layer, expert in value}
    except (TypeError, ValueError):
        raise ValueError("experts must be {layer: hex mask} or a list of [layer, expert] pairs") from None
    # `type(x) is int`: not a bool, nor a float
    if not all(type(layer) is int and type(expert) is int and layer >= 0 and expert >= 0 for layer, expert in keys):
        raise ValueError("an expert is a [layer, expert] pair of non-negative integers")
    return tuple(sorted(keys))


_checked_pairs = functools.lru_cache(maxsize=64)(_pairs)


_UNMASKED: dict[tuple[tuple[Any, Any], ...], ExpertKeys] = {}  # masks met lately -> their pairs
UNMASKED_PAIRS = 200_000  # pairs remembered at most (~15 MB): the holdings of ~45 DeepSeek-V3 hosts at 30%


def _unmask(masks: dict[Any, Any]) -> ExpertKeys:
    """{layer: hex mask} as (layer, expert) pairs. Remembered: a host's heartbeats repeat their masks,
    and a repeat is neither checked nor expanded again."""
    items = tuple(masks.items())
    try:
        return _UNMASKED[items]
    except KeyError:
        pass
    except TypeError:  # unhashable: a list or an object where a mask belongs
        raise ValueError("experts: each layer needs a hex mask") from None
    keys = []
    for layer, mask in items:
        if not (isinstance(layer, str) and _LAYER.fullmatch(layer) and isinstance(mask, str) and _MASK.fullmatch(mask)):
            raise ValueError(f"experts: layer {layer!r} needs a hex mask of 1 to {MAX_MASK_HEX} digits")
        bits, row = int(mask, 16), int(layer)
        while bits:
            low = bits & -bits
            keys.append((row, low.bit_length() - 1))
            bits ^= low
    while _UNMASKED and sum(map(len, _UNMASKED.values())) + len(keys) > UNMASKED_PAIRS:
        _UNMASKED.pop(next(iter(_UNMASKED)), None)  # the oldest
    _UNMASKED[items] = pairs = tuple(sorted(keys))
    return pairs


@functools.lru_cache(maxsize=64)
def _masks(keys: ExpertKeys) -> dict[str, str]:
    masks: dict[int, int] = {}
    for layer, expert in keys:
        masks[layer] = masks.get(layer, 0) | 1 << expert
    return {str(layer): format(bits, "x") for layer, bits in sorted(masks.items())}


class StatusCommand(Message):
    kind: Literal["status"] = "status"


class LoadCommand(Message):
    """Fetch these experts from the weights store, hold them and subscribe (make-before-break: add)."""

    kind: Literal["load"] = "load"
    epoch: int = Field(ge=0)
    experts: list[tuple[int, int]] = Field(min_length=1)


class UnloadCommand(Message):
    """Unsubscribe these experts, answer the calls already received, then free them (break)."""

    kind: Literal["unload"] = "unload"
    epoch: int = Field(ge=0)
    experts: list[tuple[int, int]] = Field(min_length=1)


HostCommand = Annotated[StatusCommand | LoadCommand | UnloadCommand, Field(discriminator="kind")]
HOST_COMMAND: TypeAdapter[StatusCommand | LoadCommand | UnloadCommand] = TypeAdapter(HostCommand)


def parse_host_command(payload: bytes) -> StatusCommand | LoadCommand | UnloadCommand:
    """Decode a host command: not JSON is InvalidJSON (as on every subject), a bad command BadRequest."""
    data = load_json(payload, "host command")
    try:
        return HOST_COMMAND.validate_python(data)
    except ValidationError as exc:
        raise BadRequest(f"bad host command ({describe_validation_error(exc)}); kinds: status, load, unload") from None


class Plan(Message):
    """The placement plan in KV `prism_placement`, key `plan` (placement service and `prism up` write
    it; the migrator, the gatings and `prism status` read it).

    `routes` (optional; absent = every home executes every layer itself, what plans before routes
    meant): home node name → the node name that executes each decoder layer for that home's requests,
    one entry per decoder layer of the model (dense layers included: a dense layer runs where the layer
    before it ran, at home for leading ones). Every route has the same length.
    """

    epoch: int = Field(ge=0)
    model: str
    policy: str
    hosts: dict[str, list[tuple[int, int]]] = Field(description="host → held (layer, expert) pairs")
    objective: float | None = Field(None, description="remote (token, expert) calls on the window it was made from")
    routes: dict[str, list[str]] | None = Field(None, description="home node → executing node per decoder layer")

    @model_validator(mode="after")
    def _routes_agree(self) -> Plan:
        if self.routes:
            lengths = {len(r) for r in self.routes.values()}
            if len(lengths) != 1 or 0 in lengths:
                raise ValueError(f"every route needs one node per decoder layer, got lengths {sorted(lengths)}")
            names = set(self.routes).union(*self.routes.values())
            bad = sorted(n for n in names if not is_token(n))
            if bad:
                raise ValueError(f"route node names must be subject tokens, got {bad[:3]}")
        return self

    def encode(self) -> bytes:
        """JSON for the KV entry; fields that are None are left out (an old reader sees an old plan)."""
        return self.model_dump_json(exclude_none=True).encode()


def parse_plan(payload: bytes) -> Plan:
    """Decode a plan from KV: not JSON is InvalidJSON, a bad plan BadRequest."""
    data = load_json(payload, "plan")
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(f"bad plan ({describe_validation_error(exc)})") from None
