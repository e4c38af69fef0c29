"""A tiny FunctionApp whose functions record how the dev host calls them (for the host's own tests)."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field

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

    def wait_for(self, predicate, timeout: float = 20.0) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: predicate(self), timeout)


probe = Probe()
bp = func.Blueprint()


@bp.queue_trigger(arg_name="msg", queue_name=PROBE_QUEUE, connection="AzureWebJobsStorage")
def probe_queue(msg: func.QueueMessage) -> None:
    body = msg.get_body()
    with probe.lock:
        probe.running += 1
        probe.max_running = max(probe.max_running, probe.running)
    with probe.changed:
        probe.changed.notify_all()
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
        with probe.lock:
            probe.running -= 1
        with probe.changed:
            probe.changed.notify_all()


@bp.route(route="items/{item_id}", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def get_item(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse(
        json.dumps({"item_id": req.route_params["item_id"], "q": req.params.get("q")}), mimetype="application/json"
    )


@bp.route(route="open", methods=["GET", "POST"], auth_level=func.AuthLevel.ANONYMOUS)
def open_route(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse(req.get_body() or b"open", status_code=200)


@bp.timer_trigger(arg_name="timer", schedule="0 0 3 * * *")
def nightly(timer: func.TimerRequest) -> None:
    probe.timer_runs += 1


app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
app.register_functions(bp)
