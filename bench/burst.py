"""Benchmark (d): a burst of webhooks on an account that is already backfilled, and meanwhile a lone new
contact of ANOTHER connected account (signed in as another Dataverse user, so its limits are its own).

The burst is `contact.updated` for `size` existing contacts (a CSV import or a bulk reassignment in Wave
looks like this), posted by 8 threads to the app's front. Measured: from the first post to the moment
Dynamics holds every new version (the last successful write before the rows were verified), contacts/s
(against the ceiling and the naive per-contact baseline of the same run), Dataverse requests per contact,
429s; and the lone contact's latency from its post until a Web API read (as a third user, the benchmark's
app token) finds its row.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bench.backfill import baseline_client
from bench.intake import process_cpu_seconds
from dataverse.errors import Throttled
from devstack.demo import Burst, connect, deliver, wave_change, wave_state
from devstack.stack import Stack, dataverse_control, dataverse_rows
from devstack.wave_sim import WebhookSender
from sync.mapping import external_id

OTHER_ACCOUNT = "acct_bench_other"
OTHER_USER = ("sales.lead@contoso.test", "5a1e5000-0000-4000-8000-00000000d001", "Other Account Admin")
POLL_SECONDS = 0.05


@dataclass
class BurstResult:
    name: str
    events: int
    post_seconds: float  # first post to last answer
    seconds: float  # from `start` (first post, or the backlog's release) to Dynamics holding every new version
    requests: int  # the burst account's Web API requests meanwhile
    throttled: int  # their 429s
    statuses: Counter = field(default_factory=Counter)
    lone_latency: float | None = None  # seconds
    lone_sent_after: float = 0.0  # seconds after `start`
    writes: int = 0  # rows written by the burst account's requests
    cpu_ms: dict[str, float] = field(default_factory=dict)  # process -> CPU ms per webhook, first post to done

    @property
    def per_second(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    @property
    def requests_per_contact(self) -> float:
        return self.requests / self.events if self.events else float("nan")


def connect_other(stack: Stack) -> str:
    """Connect the other account as another Dataverse user (the Entra stand-in signs that user in)."""
    assert stack.entra is not None
    stack.entra.sign_in_as(*OTHER_USER)
    try:
        connect(stack, OTHER_ACCOUNT, auto_sync=False)
    finally:
        stack.entra.reset()
    return OTHER_ACCOUNT


def _lone_latency(stack: Stack, found_after: float) -> tuple[float | None, float]:
    """Post one new contact of the other account: (seconds until a Web API read finds it, when it was sent
    (time.time() - found_after))."""
    client = baseline_client(stack)
    sender = WebhookSender(f"{stack.devhost_url}/api/webhooks/wave", [stack.options.webhook_secret])
    try:
        event = wave_change(stack, OTHER_ACCOUNT, {"first_name": "Lone", "last_name": uuid.uuid4().hex[:8]})
        ext = external_id(event["data"]["contact"]["id"])
        sent = time.monotonic()
        sent_at = time.time()
        if sender.deliver(event).status_code != 202:
            return None, sent_at - found_after
        while time.monotonic() - sent < 120:
            try:
                if client.find_contacts([ext]):
                    return time.monotonic() - sent, sent_at - found_after
            except Throttled as exc:  # 20 reads/s is the poll's own user's whole request budget
                time.sleep(exc.retry_after)
            time.sleep(POLL_SECONDS)
        return None, sent_at - found_after
    finally:
        client.close()


def _user_of(stack: Stack, account: str) -> str | None:
    """The Dataverse user (systemuserid) whose writes are the account's: the one that created its rows."""
    for row in dataverse_rows(stack):
        if str(row.get("externaluseridentifier") or "").startswith("wavecnct_"):
            return str(row.get("_createdby_value") or "") or None
    return None


def _updates(stack: Stack, account: str, size: int, offset: int) -> tuple[list[dict[str, Any]], set[str], str]:
    """`size` contact.updated events for existing contacts (spread over the account's ids), not yet sent."""
    live, _ = wave_state(stack, account)
    ids = sorted(live)[offset::2][:size]
    marker = f"Burst {uuid.uuid4().hex[:6]}"
    return [wave_change(stack, account, {"id": cid, "job_title": marker}) for cid in ids], \
        {external_id(cid) for cid in ids}, marker


def _holds_all(stack: Stack, wanted: set[str], marker: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = [r for r in dataverse_rows(stack) if r.get("externaluseridentifier") in wanted]
        if len(rows) >= len(wanted) and all(r.get("jobtitle") == marker for r in rows):
            return
        time.sleep(1.0)
    raise RuntimeError("the burst did not reach Dynamics in time")


def _measure(stack: Stack, name: str, user: str | None, since: float, start: float, events: list[dict[str, Any]],
             burst: Burst, post_seconds: float, lone: tuple[float | None, float]) -> BurstResult:
    log: list[dict[str, Any]] = dataverse_control(stack, "GET", "log?limit=100000")  # type: ignore[assignment]
    # a 429 is answered before the caller is known: those meanwhile count as the burst's (the lone contact's
    # account and the poll stay far below their own limits)
    mine = [e for e in log if e["t"] > since and (e.get("user") == user or (e.get("user") is None
                                                                           and e["status"] == 429))]
    writes = [e for e in mine if e["method"] != "GET" and 200 <= e["status"] < 300 and e.get("writes")]
    last = max((e["t"] for e in writes), default=time.time())
    return BurstResult(name, len(events), post_seconds, last - start, sum(1 for e in mine if e.get("user") == user),
                       sum(1 for e in mine if e["status"] == 429), burst.statuses, lone[0], lone[1] - start,
                       sum(int(e["writes"]) for e in writes))


def stack_pids(stack: Stack) -> dict[str, int]:
    """Every process of the stack by name, and this one (the benchmark: the poster's threads)."""
    pids = {name: p.proc.pid for name, p in stack.procs.items() if p.alive()}
    if stack.azurite is not None:
        pids["azurite"] = stack.azurite.proc.pid
    pids["bench (poster)"] = os.getpid()
    return pids


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for name, pid in pids.items():
        try:
            out[name] = process_cpu_seconds(pid)
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    return out


def _last_log_time(stack: Stack) -> float:
    tail: list[dict[str, Any]] = dataverse_control(stack, "GET", "log?limit=1")  # type: ignore[assignment]
    return tail[-1]["t"] if tail else 0.0


def run_burst(stack: Stack, account: str, size: int, window: float, backlog: bool = True) -> list[BurstResult]:
    """Two bursts of `size`: as the webhooks arrive (one HTTP instance takes them here), then as a backlog
    (every change stored before anything drains: the contact worker instances are stopped while the webhooks
    are posted, and timing starts when they are started again, cold), each with the other account's lone
    contact meanwhile."""
    user = _user_of(stack, account)
    sender = WebhookSender(f"{stack.devhost_url}/api/webhooks/wave", [stack.options.webhook_secret])
    results = []

    events, wanted, marker = _updates(stack, account, size, 0)
    since, burst = _last_log_time(stack), Burst(events)
    pids = stack_pids(stack)
    cpu0 = cpu_seconds(pids)
    start = time.time()
    poster = threading.Thread(target=deliver, args=(sender, events, burst), daemon=True)
    poster.start()
    while sum(burst.statuses.values()) < size // 4 and poster.is_alive():
        time.sleep(0.01)
    lone = _lone_latency(stack, 0.0)
    poster.join()
    post_seconds = time.time() - start
    _holds_all(stack, wanted, marker)
    cpu1 = cpu_seconds(pids)
    arrive = _measure(stack, "as the webhooks arrive", user, since, start, events, burst, post_seconds, lone)
    # CPU from the first post until every row was seen (the check polls once a second: a little idle time)
    arrive.cpu_ms = {n: (cpu1[n] - cpu0[n]) * 1000 / size for n in cpu1 if n in cpu0}
    results.append(arrive)
    if not backlog:
        return results

    time.sleep(window)  # the next one on a fresh window too
    events, wanted, marker = _updates(stack, account, size, 1)
    since, burst = _last_log_time(stack), Burst(events)
    workers = stack.instance_names("contact_worker")
    for name in workers:  # nothing drains while the backlog is stored
        stack.kill_instance(name)
    posted = time.time()
    deliver(sender, events, burst)
    post_seconds = time.time() - posted
    start = 0.0
    for name in workers:
        stack.restart_instance(name, kill=False)
        # from the moment the first answers its health check (the host is up, the app not yet warm): it drains
        # while the others start, and a small backlog was written before the last of them was up
        start = start or time.time()
    lone = _lone_latency(stack, 0.0)
    _holds_all(stack, wanted, marker)
    results.append(_measure(stack, "as a backlog (all stored first)", user, since, start, events, burst,
                            post_seconds, lone))
    return results
