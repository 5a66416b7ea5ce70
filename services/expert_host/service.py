"""Expert host: holds routed experts and answers expert calls for them (a call: the rows of one layer
for one expert; a message carries one call, or on the host subject several).

Subjects:
- `prism.v1.expert.<layer>.<expert>` (queue group `prism-experts`), one subscription per held expert:
  request = tensor envelope of hidden states [n, D]; reply = envelope of expert outputs [n, D].
  An empty request is a reachability probe and gets an empty reply.
- `prism.v1.host.<host>.calls`: the calls of several experts of one layer in one envelope
  (meta `layer`, `experts`, `counts` = rows per expert); the reply holds the outputs in the same order.
- `prism.v1.host.<host>.cmd`: a nats.micro endpoint (service `prism-expert-host`, discoverable with
  `$SRV.PING`): `{"kind": "status"}`, `{"kind": "load", "epoch", "experts"}` (fetch from the object
  store `prism_weights`, then subscribe) and `{"kind": "unload", ...}` (drain, then free); each
  answers the HostStatus after the change, or an error.
- `prism.v1.host.<host>.status`: HostStatus heartbeat every `heartbeat_interval_s`.

Embedded: the same component runs inside a gating's process for the experts of the node's own
devices (`services/gating/service.py` builds it on the gating's connection). There the gating calls
`compute_block` on its hidden states (no envelope, no broker); everything else (subscriptions for
other nodes, commands, heartbeats, the budget, migration) is what a separate host process does.

Failure behaviour: a bad envelope, wrong hidden size or dtype, or an expert this host does not hold is
answered with an error reply (Nats-Service-Error headers + JSON body) and the host keeps serving.
Messages of more than `inline_max_tokens` rows run on a worker thread so heartbeats and pings keep
flowing; smaller ones (a thread hop costs more than their math) run inline. More than
`max_pending` messages in flight are refused with `overloaded` (a bounded queue: an embedded host must
not let other nodes' messages pile up behind its gating's steps). `stop()` unsubscribes,
then waits (bounded) for in-flight messages to be answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
import torch
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointStats, Service, ServiceConfig

from services.expert_host.settings import ExpertHostSettings
from shared import subjects
from shared.codec import decode_tensor, encode_tensor
from shared.errors import BadRequest, BadTensor, OverBudget, Overloaded, PrismError, ShuttingDown, UnknownExpert
from shared.model.inference import executor, inference, inference_only, use_threads
from shared.model.moe import ExpertWeights, run_experts
from shared.schemas import ExpertKeys, HostStatus, LoadCommand, StatusCommand, UnloadCommand, parse_host_command
from shared.weights import WeightsStore, fetch_expert

log = structlog.get_logger()
SERVICE_NAME = subjects.SERVICE_HOST


@dataclass
class Counters:
    calls: int = 0
    tokens: int = 0
    errors: int = 0
    messages: int = 0
    busy_s: float = 0.0  # answering data messages: with the transport's round trip, a layer's wait
    direct_calls: int = 0  # expert calls computed for the gating of this process (embedded), no message
    direct_tokens: int = 0
    direct_s: float = 0.0  # seconds of that compute
    per_expert: dict[str, int] = field(default_factory=dict)


class ExpertHost:
    """Serves `weights` on NatsClient; `__init__` does no I/O."""

    def __init__(
        self,
        nc: NatsClient,
        settings: ExpertHostSettings,
        weights: dict[tuple[int, int], ExpertWeights],
        hidden_size: int,
        store: WeightsStore | None = None,
        *,
        embedded: bool = False,
    ) -> None:
        self.nc = nc
        self.embedded = embedded  # lives in a gating's process (its own connection is the gating's)
        self.store = store
        self.instance = uuid.uuid4().hex[:12]  # a restarted host is a new instance (the migrator retries)
        self.model_id = settings.model_id or settings.model.name
        self.settings = settings
        self.weights = weights
        self.on_change: list[Callable[[], None]] = []  # called whenever `weights` gains or loses an expert (the
        # gating of this process caches who holds what)
        self.hidden_size = hidden_size
        self.dtype = getattr(torch, settings.dtype)
        self.device = torch.device(settings.device)  # where its experts compute
        self.counters = Counters()
        self._subscriptions: dict[tuple[int, int], Subscription] = {}
        self._answering: ExpertKeys | None = None  # sorted keys of `_subscriptions`; None: to be rebuilt
        self._host_calls: Subscription | None = None
        self._executor = executor(f"experts-{settings.host}")
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self._micro: Service | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._spinner: asyncio.Task[None] | None = None
        self._last_message = 0.0

    async def start(self) -> None:
        self._micro = await add_service(
            self.nc,
            ServiceConfig(
                name=SERVICE_NAME,
                version="1.0.0",
                description="Prism expert host",
                metadata={"host": self.settings.host, "node": self.settings.node},
                stats_handler=self._stats_data,
            ),
        )
        await self._micro.add_endpoint(
            name="cmd",
            subject=subjects.host_cmd(self.settings.host),
            handler=self._on_cmd,
            queue_group=self.settings.host,
        )
        for key in sorted(self.weights):
            await self.subscribe(key)
        self._host_calls = await self.nc.subscribe(subjects.host_calls(self.settings.host), cb=self._on_message)
        await self.nc.flush()
        self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name=f"heartbeat-{self.settings.host}")
        log.info(
            "expert_host_started",
            host=self.settings.host,
            node=self.settings.node,
            experts=len(self.weights),
            embedded=self.embedded,
        )

    async def subscribe(self, key: tuple[int, int]) -> None:
        """Start answering calls for expert `key` (its weights must be resident)."""
        if key not in self._subscriptions:
            subject = subjects.expert(*key)
            queue = subjects.EXPERT_QUEUE
            self._subscriptions[key] = await self.nc.subscribe(subject, queue=queue, cb=self._on_message)
            self._answering = None

    # ---- data plane --------------------------------------------------------------------------

    async def _on_message(self, msg: Msg) -> None:
        if not msg.data:  # an empty request is a reachability probe (used for readiness checks)
            await msg.respond(b"")
            return
        self._in_flight += 1
        self._idle.clear()
        started = time.perf_counter()
        try:
            if self._stopping:
                raise ShuttingDown(f"host {self.settings.host} is shutting down")
            if self._in_flight > self.settings.max_pending:
                raise Overloaded(f"host {self.settings.host} has {self._in_flight - 1} messages in flight; retry later")
            hidden, meta = self._decode(msg.data)
            if msg.subject == subjects.host_calls(self.settings.host):
                layer, experts, counts = self._call_parts(hidden, meta)
            else:
                (layer, expert), counts = subjects.parse_expert(msg.subject), [hidden.shape[0]]
                experts = [expert]
            out = await self._compute(layer, experts, counts, hidden)
            self._count(layer, experts, hidden.shape[0])
            await msg.respond(encode_tensor(out, meta))
            self.counters.messages += 1
            self.counters.busy_s += time.perf_counter() - started
            self._stay_awake()
        except PrismError as err:
            self.counters.errors += 1
            log.warning("message_refused", subject=msg.subject, code=err.code, error=err.message)
            await self._respond_error(msg, err)
        except Exception:  # a bug must cost one message, answered, not the host or a caller's timeout
            self.counters.errors += 1
            log.exception("message_failed", subject=msg.subject)
            await self._respond_error(msg, PrismError(f"host {self.settings.host} failed on this batch"))
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    def _stay_awake(self) -> None:
        """Busy-poll for `busy_poll_s` after a message: the next layer's message follows within a millisecond
        or two, and a process woken from sleep answers it markedly later on virtual machines (an echo
        through a leaf here: 1.0 ms p50 sleeping, 0.5 ms polling; bench/serving.py compares both).
        Like Linux's busy_poll, bounded; it costs a core while it lasts."""
        self._last_message = time.monotonic()
        if self._spinner is None and self.settings.busy_poll_s > 0:
            self._spinner = asyncio.create_task(self._spin(), name=f"busy-poll-{self.settings.host}")

    async def _spin(self) -> None:
        try:
            while time.monotonic() - self._last_message < self.settings.busy_poll_s:  # noqa: ASYNC110 - spinning is the point
                await asyncio.sleep(0)  # one event-loop turn: polls the socket without blocking
        finally:
            self._spinner = None

    def _decode(self, payload: bytes) -> tuple[torch.Tensor, dict[str, Any]]:
        hidden, meta = decode_tensor(payload)
        if hidden.dim() != 2 or hidden.shape[1] != self.hidden_size:
            raise BadTensor(f"expected hidden states of shape [n, {self.hidden_size}], got {list(hidden.shape)}")
        if hidden.dtype != self.dtype:
            raise BadTensor(f"expected dtype {self.settings.dtype}, got {str(hidden.dtype).removeprefix('torch.')}")
        return hidden, meta

    @staticmethod
    def _call_parts(hidden: torch.Tensor, meta: dict[str, Any]) -> tuple[int, list[int], list[int]]:
        """(layer, experts, rows per expert) of a host message, checked against the tensor."""
        layer, experts, counts = meta.get("layer"), meta.get("experts"), meta.get("counts")
        if not (
            isinstance(layer, int)
            and isinstance(experts, list)
            and isinstance(counts, list)
            and len(experts) == len(counts)
            and all(isinstance(x, int) and x >= 0 for x in [*experts, *counts])
            and sum(counts) == hidden.shape[0]
        ):
            raise BadTensor("a host message needs meta layer, experts and counts (rows per expert, summing to n)")
        return layer, experts, counts

    async def _compute(self, layer: int, experts: list[int], counts: list[int], hidden: torch.Tensor) -> torch.Tensor:
        return await self._run(self._weights(layer, experts), hidden, counts)

    async def compute_block(
        self, layer: int, experts: list[int], rows: torch.Tensor, counts: list[int]
    ) -> torch.Tensor:
        """The embedded path, for the gating of this process: rows [N, D] hold `counts[i]` rows of
        `experts[i]` in turn (no envelope, no broker); returns their outputs [N, D] in the same order.
        Inline for small calls, on the host's worker thread for big ones (as for a batch from the
        bus). Raises UnknownExpert for an expert no longer resident."""
        weights = self._weights(layer, experts)
        started = time.perf_counter()
        out = await self._run(weights, rows, counts)
        self.count_direct(len(experts), rows.shape[0], time.perf_counter() - started)
        return out

    def count_direct(self, experts: int, rows: int, seconds: float) -> None:
        """Count expert calls computed for the gating of this process, by `compute_block` or by the
        gating itself with this host's weights (a decode step's small block, in one loop)."""
        self.counters.direct_calls += experts
        self.counters.direct_tokens += rows
        self.counters.direct_s += seconds

    def _weights(self, layer: int, experts: list[int]) -> list[ExpertWeights]:
        try:
            return [self.weights[(layer, e)] for e in experts]
        except KeyError:
            names = ", ".join(f"{layer}.{e}" for e in experts if (layer, e) not in self.weights)
            raise UnknownExpert(f"host {self.settings.host} does not hold expert {names}") from None

    async def _run(self, weights: list[ExpertWeights], rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        if rows.shape[0] <= self.settings.inline_max_tokens:  # a thread hop costs more than the math
            return self._run_block(weights, rows, counts)
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run_block, weights, rows, counts)

    def _run_block(self, weights: list[ExpertWeights], rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Each expert on its rows of the expert-sorted block, outputs in the same order."""
        with inference():  # once per block, and only where the thread is not in it: it costs about a small expert
            return run_experts(weights, rows.to(self.device), counts)

    def _count(self, layer: int, experts: list[int], tokens: int) -> None:
        self.counters.calls += len(experts)  # one per expert, whichever subject carried it
        self.counters.tokens += tokens
        for expert in experts:
            name = f"{layer}.{expert}"
            self.counters.per_expert[name] = self.counters.per_expert.get(name, 0) + 1

    async def _respond_error(self, msg: Msg, err: PrismError) -> None:
        if msg.reply:
            await self.nc.publish(msg.reply, err.body(), headers=err.headers())

    # ---- control plane -----------------------------------------------------------------------

    async def _on_cmd(self, request: Request) -> None:
        try:
            command = parse_host_command(request.data or b"{}")
            if isinstance(command, LoadCommand):
                await self.load(command.experts)
            elif isinstance(command, UnloadCommand):
                await self.unload(command.experts)
            if not isinstance(command, StatusCommand):  # gatings route by heartbeats: tell them now
                await self.nc.publish(
                    subjects.host_status(self.settings.host), self.status().model_dump_json().encode()
                )
        except PrismError as err:
            log.warning("command_refused", host=self.settings.host, code=err.code, error=err.message)
            await request.respond(err.body(), headers=err.headers())
            return
        await request.respond(self.status().model_dump_json().encode())

    async def load(self, keys: list[tuple[int, int]]) -> None:
        """Fetch `keys` from the weights store within the memory budget, then subscribe to them."""
        if self.store is None:  # the migrator may have created the bucket after this host started
            self.store = await open_store(self.nc, self.settings.weights_bucket)
        if self.store is None:
            raise BadRequest(f"host {self.settings.host} has no weights store ({self.settings.weights_bucket})")
        limit = int(self.settings.memory_limit_mb * 2**20)
        used = sum(w.nbytes() for w in self.weights.values())
        todo = sorted(set(keys) - set(self.weights))
        async with contextlib.aclosing(self._fetched(self.store, todo)) as fetched:
            async for key, weights in fetched:
                if used + weights.nbytes() > limit:
                    raise OverBudget(
                        f"expert {key[0]}.{key[1]} does not fit: {used + weights.nbytes()} > {limit} bytes"
                    )
                used += weights.nbytes()
                self.weights[key] = weights.to(device=self.device)
                self._changed()
                await self.subscribe(key)
                log.info("expert_loaded", host=self.settings.host, layer=key[0], expert=key[1])
        await self.nc.flush()

    async def _fetched(
        self, store: WeightsStore, keys: list[tuple[int, int]]
    ) -> AsyncGenerator[tuple[tuple[int, int], ExpertWeights], None]:
        """`keys`' weights from the store, in order, `load_concurrency` fetches under way at once: an object
        costs several round trips to the hub besides its bytes, which one fetch at a time would pay in turn
        (bench/migration.py). They wait in host memory, at most that many beyond the ones admitted, and
        go to the experts' device once admitted, so that the device never holds more than the budget."""
        todo = iter(keys)
        window: deque[tuple[tuple[int, int], asyncio.Future[ExpertWeights]]] = deque()

        def top_up() -> None:
            while len(window) < self.settings.load_concurrency and (key := next(todo, None)) is not None:
                fetch = fetch_expert(store, self.model_id, key, hidden_size=self.hidden_size, dtype=self.dtype,
                                     device="cpu")
                window.append((key, asyncio.ensure_future(fetch)))

        top_up()
        try:
            while window:
                key, fetch = window.popleft()
                weights = await fetch
                top_up()
                yield key, weights
        finally:  # a fetch failed or an expert did not fit: the rest are not wanted
            for _, fetch in window:
                fetch.cancel()
            await asyncio.gather(*(fetch for _, fetch in window), return_exceptions=True)

    async def unload(self, keys: list[tuple[int, int]]) -> None:
        """Stop taking calls for `keys`, answer the ones already received (drain), then free them."""
        for key in sorted(set(keys)):
            sub = self._subscriptions.pop(key, None)
            self._answering = None
            if sub is not None:
                await sub.drain()  # type: ignore[no-untyped-call]  # nats-py leaves it unannotated
            if self.weights.pop(key, None) is not None:
                self._changed()
                log.info("expert_unloaded", host=self.settings.host, layer=key[0], expert=key[1])

    def _changed(self) -> None:
        for listener in self.on_change:
            listener()

    def status(self) -> HostStatus:
        used = sum(w.nbytes() for w in self.weights.values())
        return HostStatus(
            host=self.settings.host,
            node=self.settings.node,
            device=self.settings.device,
            memory_used_bytes=used,
            memory_limit_bytes=int(self.settings.memory_limit_mb * 2**20),
            experts=self._answered_experts(),
            queue_depth=self._in_flight,
            calls_served=self.counters.calls,
            tokens_served=self.counters.tokens,
            errors=self.counters.errors,
            messages_served=self.counters.messages,
            busy_s=self.counters.busy_s,
            direct_calls=self.counters.direct_calls,
            direct_tokens=self.counters.direct_tokens,
            direct_s=self.counters.direct_s,
            embedded=self.embedded,
            speed=self.settings.speed,
            instance=self.instance,
        )

    def _answered_experts(self) -> ExpertKeys:
        """The experts it answers for, ascending: one tuple until they change, which the status check
        remembers (a heartbeat every second would sort and check thousands of pairs again)."""
        if self._answering is None:
            self._answering = tuple(sorted(self._subscriptions))
        return self._answering

    def _stats_data(self, endpoint: EndpointStats) -> dict[str, object]:
        return {"status": self.status().model_dump(), "calls_per_expert": dict(self.counters.per_expert)}

    async def _heartbeat_loop(self) -> None:
        subject = subjects.host_status(self.settings.host)
        while True:
            with contextlib.suppress(Exception):  # a lost heartbeat is harmless; the next one follows
                await self.nc.publish(subject, self.status().model_dump_json().encode())
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    async def linger(self, quiet_s: float, timeout_s: float) -> None:
        """Keep serving the bus until no message came for `quiet_s` (at most `timeout_s`): an embedded
        host whose gating stops still holds experts other nodes' running requests need (in a whole-stack
        stop, every gating drains at once); it goes once they stop asking."""
        deadline = time.monotonic() + timeout_s
        while (quiet_left := self._last_message + quiet_s - time.monotonic()) > 0:
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(min(quiet_left, deadline - time.monotonic()))

    async def stop(self) -> None:
        """Stop taking calls, answer the ones in flight (bounded), release resources."""
        self._stopping = True
        for sub in self._subscriptions.values():
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subscriptions.clear()
        self._answering = None
        if self._host_calls is not None:
            with contextlib.suppress(Exception):
                await self._host_calls.unsubscribe()
        started = time.monotonic()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.drain_timeout_s):
                await self._idle.wait()
        for task in (self._heartbeat, self._spinner):
            if task is not None:
                task.cancel()
        if self._micro:
            with contextlib.suppress(Exception):  # the connection may already be gone
                await self._micro.stop()
        self._executor.shutdown(wait=False)
        log.info("expert_host_stopped", host=self.settings.host, drain_s=round(time.monotonic() - started, 3))


def load_weights(settings: ExpertHostSettings) -> tuple[dict[tuple[int, int], ExpertWeights], int]:
    """Read the configured experts from the checkpoint, within the memory budget; returns (weights, D)."""
    from services.expert_host.residency import check_budget, parse_experts
    from shared.model.checkpoint import load_config, load_experts
    from shared.model.config import list_moe_layers

    config = load_config(settings.model)
    keys = parse_experts(settings.experts, list_moe_layers(config), config.num_experts)
    dtype = getattr(torch, settings.dtype)
    check_budget(len(keys), config.expert_nbytes(settings.dtype), int(settings.memory_limit_mb * 2**20))
    return load_experts(settings.model, keys, dtype=dtype, device=settings.device), config.hidden_size


async def open_store(nc: NatsClient, bucket: str) -> WeightsStore | None:
    """The weights store through the hub's JetStream domain; None (and a warning) where there is none."""
    try:
        return await WeightsStore.open(nc.jetstream(domain=subjects.JETSTREAM_DOMAIN), bucket)
    except Exception as exc:  # no JetStream or no bucket yet: serve the settings' experts, refuse loads
        log.warning("weights_store_unavailable", bucket=bucket, error=repr(exc))
        return None


async def main(settings: ExpertHostSettings) -> None:
    from services.expert_host.metrics import host_registry
    from shared.logs import configure_logging
    from shared.metrics_http import serve_metrics
    from shared.runtime import connect, serve_until_stopped

    configure_logging(settings.log_level, settings.log_format, service="expert_host", host=settings.host)
    use_threads(settings.inline_threads, settings.compute_threads)
    inference_only()
    weights, hidden_size = load_weights(settings)
    nc = await connect(settings, f"expert-host-{settings.host}")
    store = await open_store(nc, settings.weights_bucket)
    host = ExpertHost(nc, settings, weights, hidden_size, store)
    async with serve_metrics(host_registry(host), settings.metrics_bind, settings.metrics_port, "expert_host"):
        await serve_until_stopped(host.start(), host.stop, nc)


def main_cli() -> None:
    from shared.runtime import run_service

    run_service(ExpertHostSettings, main, "expert_host")
