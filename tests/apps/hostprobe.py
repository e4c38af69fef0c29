"""A tiny FunctionApp whose functions record how the dev host calls them (for the host's own tests)."""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime

import azure.functions as func

PROBE_QUEUE = "probe-items"


@dataclass
class Probe:
    calls: list[tuple[str, int, bytes]] = field(default_factory=list)  # (message id, dequeue_count, body)
    failures_left: dict[bytes, int] = field(default_factory=dict)  # body -> how many attempts still fail
    running: int = 0
    max_running: int = 0
    gate: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    changed: threading.Condition = field(default_factory=threading.Condition)
    timer_runs: int = 0
    ticks: list[tuple[datetime, dict]] = field(default_factory=list)  # (when it ran, its ScheduleStatus)
    http_blocked: int = 0  # `GET /api/block` calls that have returned

    def enter(self) -> None:
        with self.lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        self.notify()

    def leave(self) -> None:
        with self.lock:
            self.running -= 1
        self.notify()

    def notify(self) -> None:
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, predicate, timeout: float = 20.0) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: predicate(self), timeout)


probe = Probe()
bp = func.Blueprint()


@bp.queue_trigger(arg_name="msg", queue_name=PROBE_QUEUE, connection="AzureWebJobsStorage")
def probe_queue(msg: func.QueueMessage) -> None:
    body = msg.get_body()
    probe.enter()
    try:
        if body.startswith(b"block"):
            probe.gate.wait(20)
        with probe.lock:
            probe.calls.append((msg.id, msg.dequeue_count, body))
            remaining = probe.failures_left.get(body, 0)
            if remaining:
                probe.failures_left[body] = remaining - 1
        if remaining or body == b"always-fail":
            raise RuntimeError(f"probe failure for {body!r}")
    finally:
        probe.leave()


@bp.route(route="items/{item_id}", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def get_item(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse(
        json.dumps({"item_id": req.route_params["item_id"], "params": dict(req.params)}), mimetype="application/json"
    )


@bp.route(route="block", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def block(req: func.HttpRequest) -> func.HttpResponse:
    """Holds a worker thread until the test opens the gate."""
    probe.enter()
    try:
        probe.gate.wait(20)
    finally:
        probe.leave()
    with probe.lock:
        probe.http_blocked += 1
    return func.HttpResponse("released")


@bp.route(route="async-ping", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
async def async_ping(req: func.HttpRequest) -> func.HttpResponse:
    await asyncio.sleep(0)  # raises unless it runs on an event loop
    return func.HttpResponse("pong")


@bp.route(route="open", methods=["GET", "POST"], auth_level=func.AuthLevel.ANONYMOUS)
def open_route(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse(req.get_body() or b"open", status_code=200)


@bp.timer_trigger(arg_name="timer", schedule="0 0 3 * * *")
def nightly(timer: func.TimerRequest) -> None:
    probe.timer_runs += 1
    probe.notify()


@bp.timer_trigger(arg_name="timer", schedule="*/2 * * * * *")
def every_two_seconds(timer: func.TimerRequest) -> None:
    with probe.lock:
        probe.ticks.append((datetime.now(UTC), dict(timer.schedule_status)))
    probe.notify()


app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
app.register_functions(bp)
