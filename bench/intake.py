"""Benchmark (b): webhook intake - signature check, validation, the connection (cached), the pending change's
insert and the drain marker (a message for the first webhook only: nothing drains the account meanwhile).

Runs the real HTTP handler (`functions.webhook.wave_webhook`) in this process against the stack's Azurite,
for an account the stack has connected, with the dev host stopped so nothing drains the queue meanwhile
(the figure is intake alone). CPU per request is this process's CPU time plus Azurite's (from /proc),
divided by the number of requests.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import azure.functions as func

from core.settings import get_settings
from core.storage import CONTACT_EVENTS
from devstack.stack import Stack
from functions.services import reset_services, services
from functions.webhook import wave_webhook
from sync.signature import HEADER, signature_header

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (children not included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass
class IntakeResult:
    requests: int
    threads: int
    seconds: float
    statuses: dict[int, int]
    app_cpu_ms: float  # per request, this process (the handler, the SDK clients)
    storage_cpu_ms: float  # per request, Azurite

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds


def signed_events(account_id: str, count: int, secret: str) -> list[tuple[bytes, str]]:
    out = []
    now = int(time.time())
    for i in range(count):
        event = {
            "id": f"evt_bench_{uuid.uuid4().hex}", "type": "contact.updated", "created": now, "account_id": account_id,
            "data": {"contact": {
                "id": f"c_bench_intake_{i:06d}", "version": 1, "updated_at": "2026-11-27T08:00:00Z",
                "first_name": "Intake", "last_name": f"Bench {i}", "email": f"intake.{i}@example.com",
                "phone": "+44 20 7946 0000", "company": "Bench Ltd", "job_title": "Tester",
                "website": "https://example.com", "note": "benchmark", "assigned_team_member": None}},
        }
        body = json.dumps(event, separators=(",", ":")).encode()
        out.append((body, signature_header(body, [secret], now)))
    return out


def run_intake(stack: Stack, account_id: str, *, requests: int = 2000, threads: int = 8) -> IntakeResult:
    stack.kill_devhost()  # nothing may drain the queue (or compete for CPU) while intake is measured
    saved = dict(os.environ)
    os.environ.update(stack.devhost_env)
    get_settings.cache_clear()
    reset_services()
    try:
        bodies = signed_events(account_id, requests + 50, stack.options.webhook_secret)

        def call(item: tuple[bytes, str]) -> int:
            body, signature = item
            req = func.HttpRequest(method="POST", url=f"{stack.devhost_url}/api/webhooks/wave",
                                   headers={HEADER: signature, "content-type": "application/json"}, body=body)
            return wave_webhook(req).status_code

        with ThreadPoolExecutor(threads) as pool:  # warm-up: clients, connections, tables
            list(pool.map(call, bodies[:50]))
        statuses: dict[int, int] = {}
        azurite_pid = stack.azurite.proc.pid if stack.azurite else None
        cpu0 = time.process_time()
        az0 = process_cpu_seconds(azurite_pid) if azurite_pid else 0.0
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            for status in pool.map(call, bodies[50:]):
                statuses[status] = statuses.get(status, 0) + 1
        seconds = time.perf_counter() - t0
        app_cpu = time.process_time() - cpu0
        storage_cpu = (process_cpu_seconds(azurite_pid) - az0) if azurite_pid else 0.0

        services().queues.client(CONTACT_EVENTS).clear_messages()  # the bench's messages are not real work
    finally:
        os.environ.clear()
        os.environ.update(saved)
        get_settings.cache_clear()
        reset_services()
        stack.restart_devhost(kill=False)
    return IntakeResult(requests, threads, seconds, statuses, app_cpu / requests * 1000,
                        storage_cpu / requests * 1000)
