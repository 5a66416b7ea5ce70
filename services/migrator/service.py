"""Migrator: turns each new placement plan into weight moves, make-before-break.

Stores and subjects:
- object store `prism_weights`: at start, every expert of the model is uploaded once
  (`<model>/<layer>/<expert>`, safetensors; see shared/weights.py).
- KV `prism_placement` key `plan` (watched): `{"epoch", "hosts": {host: [[layer, expert]]}}`.
- `prism.v1.host.<host>.cmd` out: status, then load / unload commands in the order of
  `steps.plan_steps` (loads acked before any unload that depends on them).
- `prism.v1.plan.applied` out: `{"epoch", "ok", "steps", "error"}`.

Failure behaviour: a plan's host that is not up yet is waited for (`host_wait_s`); a host that fails,
times out or never comes stops the epoch where it is; everything unloaded so
far had another holder, so the old holders keep serving and no request is lost. The next plan starts
again from the hosts' real residency.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import structlog
import torch
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore
from nats.micro.service import Service

from services.migrator.metrics import migrator_registry
from services.migrator.settings import MigratorSettings
from services.migrator.steps import MigrationPlanError, Step, plan_steps
from shared import subjects
from shared.errors import PrismError, error_from_headers
from shared.runtime import announce
from shared.schemas import HostStatus, LoadCommand, UnloadCommand
from shared.weights import chunk_bytes_for, open_weights_store, upload_expert

log = structlog.get_logger()


HOST_POLL_S = 0.2


class MigrationFailed(PrismError):
    code = "migration_failed"


class HostAbsent(MigrationFailed):
    """No host of that name is subscribed (not started yet, or gone)."""


class HostRestarted(Exception):
    """A new process of the host beats while a command to the old one is unanswered: it was lost."""


class Migrator:
    def __init__(self, nc: NatsClient, plans: KeyValue, store: ObjectStore, settings: MigratorSettings) -> None:
        self.nc = nc
        self.plans = plans
        self.store = store
        self.settings = settings
        self.model_id = settings.model_id or settings.model.name
        self.applied_epoch = 0
        self.expert_bytes = _expert_bytes(settings)
        self._watch: asyncio.Task[None] | None = None
        self._micro: Service | None = None
        self._heartbeats: Subscription | None = None
        self._last_beat: dict[str, float] = {}  # host -> when its last status heartbeat came
        self._instance: dict[str, str] = {}  # host -> the process that sent it (HostStatus.instance)
        self.registry, self.metrics = migrator_registry(lambda: nc.stats)  # served on METRICS_PORT by main()

    async def start(self) -> None:
        await self.upload_weights()
        self._heartbeats = await self.nc.subscribe(subjects.ALL_HOST_STATUS, cb=self._on_heartbeat)
        self._watch = asyncio.create_task(self._watch_plans(), name="watch-plans")
        self._micro = await announce(self.nc, subjects.SERVICE_MIGRATOR, {"model": self.model_id})

    async def upload_weights(self) -> int:
        """Put every expert of the model into the store (skipping those already there)."""
        from shared.model.checkpoint import load_experts

        experts = await asyncio.to_thread(
            load_experts, self.settings.model, None, dtype=getattr(torch, self.settings.dtype)
        )
        uploaded, chunk = 0, chunk_bytes_for(self.nc.max_payload)
        for key, weights in sorted(experts.items()):
            uploaded += await upload_expert(self.store, self.model_id, key, weights, chunk_bytes=chunk)
        log.info("weights_uploaded", model=self.model_id, experts=len(experts), new=uploaded)
        return uploaded

    async def _watch_plans(self) -> None:
        watcher = await self.plans.watch("plan")
        while True:
            try:
                entry = await watcher.updates(timeout=3600)  # type: ignore[no-untyped-call]
            except NatsTimeoutError:
                continue
            if entry is None or not entry.value:
                continue
            try:
                plan = json.loads(entry.value)
                if isinstance(plan, dict) and plan.get("epoch", 0) > self.applied_epoch:
                    await self.apply(plan)
            except Exception:  # a bad plan (or a bug) must not end the watch: later plans still apply
                log.exception("plan_not_applied", revision=entry.revision)

    async def apply(self, plan: dict[str, Any]) -> bool:
        """Move weights until the hosts hold `plan`; publish the outcome. True when fully applied."""
        started = time.perf_counter()
        ok = await self._apply(plan)
        self.metrics.epoch(int(plan.get("epoch", 0)), ok, time.perf_counter() - started)
        return ok

    async def _apply(self, plan: dict[str, Any]) -> bool:
        epoch = int(plan.get("epoch", 0))
        done: list[Step] = []
        try:
            target = _target(plan)
            current, capacity = await self._residency(list(target))
            steps = plan_steps(current, target, capacity)
            for group in _consecutive_by_kind(steps):
                await asyncio.gather(*(self._run(step, epoch) for step in group))
                done.extend(group)
        except (PrismError, MigrationPlanError) as err:
            log.warning("migration_failed", epoch=epoch, error=str(err), steps_done=len(done))
            await self._announce(epoch, ok=False, steps=len(done), error=str(err))
            return False
        except Exception as exc:  # a lost hub connection, a host's malformed status: still say it failed
            log.exception("migration_failed", epoch=epoch, steps_done=len(done))
            with contextlib.suppress(Exception):  # the connection may be what failed
                await self._announce(epoch, ok=False, steps=len(done), error=f"internal: {type(exc).__name__}")
            return False
        self.applied_epoch = epoch
        log.info("plan_applied", epoch=epoch, steps=len(done))
        await self._announce(epoch, ok=True, steps=len(done), error=None)
        return True

    async def _residency(self, hosts: list[str]) -> tuple[dict[str, set[tuple[int, int]]], dict[str, int]]:
        statuses = await asyncio.gather(*(self._status_once_up(h) for h in hosts))
        current = {host: {(int(k[0]), int(k[1])) for k in s.experts} for host, s in zip(hosts, statuses, strict=True)}
        capacity = {host: s.memory_limit_bytes // self.expert_bytes for host, s in zip(hosts, statuses, strict=True)}
        return current, capacity

    async def _status_once_up(self, host: str) -> HostStatus:
        """The host's status, waiting up to `host_wait_s` for a host that is not up yet: a stack starts
        its hosts and the migrator side by side, and the first plan names every host. A host that has
        beaten before and is silent for `host_ttl_s` has stopped: no waiting for it."""
        deadline = asyncio.get_running_loop().time() + self.settings.host_wait_s
        while True:
            try:
                return await self._command(host, {"kind": "status"})
            except HostAbsent:
                if asyncio.get_running_loop().time() + HOST_POLL_S > deadline or self._stopped_beating(host):
                    raise
                await asyncio.sleep(HOST_POLL_S)

    def _stopped_beating(self, host: str) -> bool:
        last = self._last_beat.get(host)
        return last is not None and time.monotonic() - last > self.settings.host_ttl_s

    async def _run(self, step: Step, epoch: int) -> None:
        cls = LoadCommand if step.kind == "load" else UnloadCommand
        command = cls(epoch=epoch, experts=list(step.experts))
        try:
            await self._command(step.host, command.model_dump())
        except Exception:
            self.metrics.step(step.kind, ok=False)
            raise
        self.metrics.step(step.kind, ok=True)

    async def _on_heartbeat(self, msg: Msg) -> None:
        host = msg.subject.split(".")[-2]  # prism.v1.host.<host>.status
        self._last_beat[host] = time.monotonic()
        with contextlib.suppress(ValueError, AttributeError):  # not JSON or not an object: time only
            self._instance[host] = str(json.loads(msg.data).get("instance", ""))

    async def _command(self, host: str, command: dict[str, Any]) -> HostStatus:
        """One command, answered or failed: within command_timeout_s, and sooner when the host stops
        beating while it works (a host killed during a load would hold the epoch for the whole timeout).
        A host restarted meanwhile (`prism up` does that) lost the command: it is sent again, once; loads
        and unloads are idempotent."""
        for attempt in (1, 2):
            try:
                return await self._command_once(host, command)
            except HostRestarted:
                log.info("host_restarted_during_command", host=host, kind=command["kind"], attempt=attempt)
        raise MigrationFailed(f"host {host} restarted twice during {command['kind']}")

    async def _command_once(self, host: str, command: dict[str, Any]) -> HostStatus:
        payload, kind = json.dumps(command).encode(), command["kind"]
        timeout_s = self.settings.command_timeout_s
        sent_to = self._instance.get(host)
        request = asyncio.ensure_future(self.nc.request(subjects.host_cmd(host), payload, timeout=timeout_s))
        try:
            while not (await asyncio.wait([request], timeout=HOST_POLL_S))[0]:
                if self._stopped_beating(host):
                    silent_s = time.monotonic() - self._last_beat[host]
                    raise HostAbsent(f"host {host} stopped during {kind} (no heartbeat for {silent_s:.0f} s)")
                if sent_to and self._instance.get(host, sent_to) != sent_to:
                    raise HostRestarted(host)
            msg = request.result()
        except NoRespondersError:
            raise HostAbsent(f"host {host} did not answer {kind} (no such host is up)") from None
        except NatsTimeoutError:
            raise MigrationFailed(f"host {host} did not answer {kind}") from None
        finally:
            request.cancel()
        error = error_from_headers(msg.headers)
        if error is not None:
            raise MigrationFailed(f"host {host} refused {kind}: {error.message}")
        return HostStatus.model_validate_json(msg.data)

    async def _announce(self, epoch: int, *, ok: bool, steps: int, error: str | None) -> None:
        event = {"epoch": epoch, "ok": ok, "steps": steps, "error": error}
        await self.nc.publish(subjects.PLAN_EVENTS, json.dumps(event).encode())

    async def stop(self) -> None:
        if self._heartbeats:
            with contextlib.suppress(Exception):
                await self._heartbeats.unsubscribe()
        if self._micro:
            with contextlib.suppress(Exception):
                await self._micro.stop()
        if self._watch:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch


def _expert_bytes(settings: MigratorSettings) -> int:
    """Bytes of one expert on a host (hosts use the migrator's dtype)."""
    from shared.model.checkpoint import load_config

    return load_config(settings.model).expert_nbytes(settings.dtype)


def _consecutive_by_kind(steps: list[Step]) -> list[list[Step]]:
    """Runs of loads or unloads: a run goes in parallel, runs go in order."""
    groups: list[list[Step]] = []
    for step in steps:
        if groups and groups[-1][0].kind == step.kind:
            groups[-1].append(step)
        else:
            groups.append([step])
    return groups


async def build(nc: NatsClient, settings: MigratorSettings) -> Migrator:
    js = nc.jetstream(domain=subjects.JETSTREAM_DOMAIN)
    plans = await js.create_key_value(bucket=settings.plans_bucket, history=16)
    store = await open_weights_store(js, settings.weights_bucket)
    return Migrator(nc, plans, store, settings)


async def main(settings: MigratorSettings) -> None:
    from shared.logs import configure_logging
    from shared.metrics_http import serve_metrics
    from shared.runtime import connect, serve_until_stopped

    configure_logging(settings.log_level, settings.log_format, service="migrator")
    nc = await connect(settings, "migrator")
    migrator = await build(nc, settings)
    async with serve_metrics(migrator.registry, settings.metrics_bind, settings.metrics_port, "migrator"):
        await serve_until_stopped(migrator.start(), migrator.stop, nc)


def main_cli() -> None:
    from shared.runtime import run_service

    run_service(MigratorSettings, main, "migrator")


def _target(plan: dict[str, Any]) -> dict[str, set[tuple[int, int]]]:
    """host → (layer, expert) set of a plan; MigrationFailed if it is malformed or names a host that
    cannot be one (every host name is a subject token)."""
    try:
        target = {host: {(int(layer), int(e)) for layer, e in keys} for host, keys in plan["hosts"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise MigrationFailed(f"malformed plan: {exc!r}") from None
    bad = [host for host in target if not subjects.is_token(host)]
    if bad:
        raise MigrationFailed(f"plan names hosts that cannot exist: {bad[:3]}")
    return target
