"""Benchmark (a): backfill throughput against the Dataverse simulator's service-protection limits.

The limits are research/dataverse.md §6 scaled in time: a `window` of W seconds instead of 300 with the
request and execution-time budgets scaled by W/300, so the sustained rates are the real ones (20
requests/s and 4 s of execution per second, per user) while a run needs minutes, not hours; so is the
extension of a penalty by a request sent during it. Retry-After stays whole seconds, as on the wire. The
simulator charges `base_ms` per request (and per request inside a $batch) plus `per_record_ms` per row
written (its defaults); a bulk request counts once against the request limit.

The ceiling the limits allow is the best any client could do: one bulk request of 1,000 rows pays
base_ms + 1000 * per_record_ms, so the execution-time budget caps a client at
(execution budget per second) / (per_record_ms + base_ms / 1000) contacts/s, and the request budget at
requests per second * 1000. That is the sustained rate (`Ceiling` says how a run can pass it); the
pipeline's steady rate leaves out its first burst, written on the empty window.

Beside the pipeline (connect with auto-sync, the real backfill through queues), two baselines use the
app's Dataverse client directly against the same limits, as a different user (own windows): naive, one
upsert request per contact; and $batch of 10 upserts per request. Each runs for a fixed time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests

from dataverse.client import DataverseClient, UpsertItem
from dataverse.errors import Throttled
from devstack.demo import TEAM, connect, seed_dynamics_users, wait_for_backfill
from devstack.stack import CLIENT_ID, Stack, dataverse_control
from sync.mapping import contact_id, map_contact

REAL_WINDOW = 300.0
REAL_REQUESTS = 6000
REAL_EXECUTION_MS = 1_200_000
MAX_BULK = 1000
# What each request sent during a penalty adds to it: the simulator's default, scaled like the window.
REAL_PENALTY_EXTENSION = 1.0
BURST_GAP = 2.0  # seconds without a bulk write that end a burst of them


@dataclass(frozen=True)
class LimitSettings:
    window_seconds: float

    @property
    def requests(self) -> int:
        return round(REAL_REQUESTS * self.window_seconds / REAL_WINDOW)

    @property
    def execution_ms(self) -> int:
        return round(REAL_EXECUTION_MS * self.window_seconds / REAL_WINDOW)

    @property
    def penalty_extension_seconds(self) -> float:
        return REAL_PENALTY_EXTENSION * self.window_seconds / REAL_WINDOW

    def simulator_args(self) -> list[str]:
        return ["--window-seconds", str(self.window_seconds), "--requests", str(self.requests),
                "--execution-ms", str(self.execution_ms),
                "--penalty-extension-seconds", f"{self.penalty_extension_seconds:.4f}"]


@dataclass
class Run:
    name: str
    contacts: int
    seconds: float
    requests: int  # Web API requests (429s included)
    throttled: int  # 429 answers
    breakdown: PageBreakdown | None = None
    during_penalty: int = 0  # requests sent while Dataverse had the user in penalty (each extends it)

    @property
    def throttled_per_1000(self) -> float:
        return self.throttled * 1000 / self.contacts if self.contacts else float("nan")

    @property
    def per_second(self) -> float:
        return self.contacts / self.seconds if self.seconds else 0.0

    @property
    def requests_per_contact(self) -> float:
        return self.requests / self.contacts if self.contacts else float("nan")


@dataclass(frozen=True)
class Ceiling:
    """What the simulator's configured limits allow any client at best (bulk requests of 1,000 rows),
    sustained. A run can pass it: it starts on an empty window, so one window's budget comes on top, and
    the limits are checked against finished requests, so those in flight when the budget runs out
    overshoot it (the service does the same)."""

    cfg: dict[str, Any]
    per_second: float
    per_window: float  # contacts one window's budget pays for


def ceiling(stack: Stack) -> Ceiling:
    """The simulator's configured limits, read back from it."""
    cfg = dataverse_control(stack, "GET", "config")
    limits, sim = cfg["limits"], cfg["config"]  # type: ignore[index]
    window = float(limits["window_seconds"])
    per_contact_ms = sim["per_record_ms"] + sim["base_ms"] / MAX_BULK
    per_window = min(limits["execution_ms"] / per_contact_ms, limits["requests"] * MAX_BULK)
    return Ceiling({**limits, "base_ms": sim["base_ms"], "per_record_ms": sim["per_record_ms"]},
                   per_window / window, per_window)


def _counters(stack: Stack) -> dict[str, Any]:
    return dataverse_control(stack, "GET", "counters")  # type: ignore[return-value]


@dataclass(frozen=True)
class PageBreakdown:
    """Where a pipeline backfill's wall time went, from the dev host's page log lines and the simulator's log."""

    pages: int  # page handler runs (a page sent back to the queue runs again)
    pages_ms: float  # all page handlers together, penalties waited out in-process included
    dataverse_ms: float  # the simulator's own time for every Web API request of the run
    elapsed_ms: float
    bursts: list[tuple[float, int]]  # bulk writes: (seconds after the connect call, rows written) per burst
    last_write_s: float  # seconds after the connect call

    @property
    def steady_per_second(self) -> float:
        """Rows written after the first burst (the one the empty window paid for), per second from that
        burst's start to the last write."""
        if len(self.bursts) < 2:
            return float("nan")
        return sum(rows for _, rows in self.bursts[1:]) / (self.last_write_s - self.bursts[0][0])


def page_breakdown(stack: Stack, seconds: float, started_at: float, account: str) -> PageBreakdown:
    times = []
    logs = stack.instance_logs("backfill_worker")
    for line in (line for log in logs for line in log.read_text(errors="replace").splitlines()):
        if '"backfill_page"' in line:
            page = json.loads(line[line.index("{"):])
            if page.get("account_id") == account:
                times.append(float(page["ms"]))
    log: list[dict[str, Any]] = dataverse_control(stack, "GET", "log")  # type: ignore[assignment]
    # kept beside the instances' logs, for reading where a run's time went
    (stack.dir / f"dataverse-requests-{account}.json").write_text(json.dumps(log))
    dataverse = sum(float(e.get("seconds") or 0) for e in log) * 1000
    writes = sorted((e["t"] - started_at, int(e["writes"])) for e in log
                    if e["method"] == "POST" and e["status"] < 300 and e.get("writes"))
    bursts: list[tuple[float, int]] = []
    for i, (at, rows) in enumerate(writes):
        if i == 0 or at - writes[i - 1][0] > BURST_GAP:
            bursts.append((at, 0))
        bursts[-1] = (bursts[-1][0], bursts[-1][1] + rows)
    return PageBreakdown(len(times), sum(times), dataverse, seconds * 1000, bursts,
                         writes[-1][0] if writes else 0.0)


PIPELINE = "pipeline (connect, auto-sync backfill through the queues)"


def run_pipeline(stack: Stack, account: str, contacts: int, show: bool = True, name: str = PIPELINE,
                 seed_users: bool = True) -> Run:
    if seed_users:  # once per stack: the simulator would hold each team member twice
        seed_dynamics_users(stack)
    members = [{"id": m.id, "email": m.email} for m in TEAM] + [None]
    requests.post(f"{stack.wave_url}/_control/accounts/{account}/populate", timeout=600,
                  json={"count": contacts, "team_members": members, "seed": 11}).raise_for_status()
    dataverse_control(stack, "POST", "reset")  # fresh limit windows and counters (users stay)
    before = _counters(stack)
    t0, started_at = time.monotonic(), time.time()  # the simulator's log is on the wall clock
    connect(stack, account)
    final = wait_for_backfill(stack, account, contacts, timeout=max(600.0, contacts / 5), show=show)
    seconds = time.monotonic() - t0
    after = _counters(stack)
    if final["backfill"]["state"] != "done":
        raise RuntimeError(f"backfill ended {final['backfill']['state']}")
    return Run(name, final["backfill"]["contacts"], seconds, after.get("requests", 0) - before.get("requests", 0),
               after.get("status_429", 0) - before.get("status_429", 0),
               page_breakdown(stack, seconds, started_at, account),
               during_penalty=after.get("sent_during_penalty", 0) - before.get("sent_during_penalty", 0))


def run_for(name: str, stack: Stack, seconds: float, step: Callable[[int], int]) -> Run:
    """Call `step(i)` (which syncs some contacts and returns how many) until `seconds` have passed."""
    dataverse_control(stack, "POST", "reset")
    before = _counters(stack)
    done, i = 0, 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        done += step(i)
        i += 1
    elapsed = time.monotonic() - t0
    after = _counters(stack)
    return Run(name, done, elapsed, after.get("requests", 0) - before.get("requests", 0),
               after.get("status_429", 0) - before.get("status_429", 0))


def baseline_payload(i: int) -> tuple[str, dict[str, Any]]:
    """(contactid, mapped payload) of the i-th contact the baselines write."""
    contact = {"id": f"c_bench_base_{i:07d}", "first_name": "Base", "last_name": f"Line {i}",
               "email": f"baseline.{i}@example.com", "company": "Baseline Ltd"}
    return contact_id("acct_bench_baseline", contact["id"]), map_contact(contact, None).payload


class EntraAppToken:
    """An app-only access token for the Dataverse simulator from the Entra stand-in (client credentials),
    so the baselines run as their own Dataverse user (the app's) with their own limit windows."""

    def __init__(self, stack: Stack) -> None:
        self.session = requests.Session()
        self.session.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would override verify
        self.session.verify = str(stack.certs.bundle) if stack.certs else True
        discovery = self.session.get(f"{stack.entra_authority}/.well-known/openid-configuration", timeout=10)
        discovery.raise_for_status()
        self.token_url = discovery.json()["token_endpoint"]
        self.form = {"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": stack.client_secret,
                     "scope": f"{stack.dataverse_url}/.default"}
        self._token: str | None = None

    def __call__(self, force_refresh: bool = False) -> str:
        if force_refresh or self._token is None:
            res = self.session.post(self.token_url, data=self.form, timeout=10)
            res.raise_for_status()
            self._token = res.json()["access_token"]
        return self._token


def baseline_client(stack: Stack, **kwargs: Any) -> DataverseClient:
    return DataverseClient(stack.dataverse_url, EntraAppToken(stack),
                           verify=str(stack.certs.bundle) if stack.certs else True, **kwargs)


def _waiting_out_throttles(call: Callable[[], Any]) -> Any:
    """What a simple sync does with a 429 whose Retry-After is too long for the client to wait inline."""
    while True:
        try:
            return call()
        except Throttled as exc:
            time.sleep(exc.retry_after)


def run_naive(stack: Stack, seconds: float) -> Run:
    """One upsert request per contact, one after the other."""
    client = baseline_client(stack)

    def step(i: int) -> int:
        row_id, payload = baseline_payload(i)
        _waiting_out_throttles(lambda: client.upsert_contact(row_id, payload))
        return 1

    try:
        return run_for("naive: one upsert request per contact", stack, seconds, step)
    finally:
        client.close()


def run_batch10(stack: Stack, seconds: float) -> Run:
    """$batch requests of 10 upserts each, one after the other."""
    client = baseline_client(stack, batch_size=10)

    def step(i: int) -> int:
        items = [UpsertItem(str(j), *baseline_payload(j)) for j in range(i * 10, i * 10 + 10)]
        result = _waiting_out_throttles(lambda: client.bulk_upsert(items, method="$batch"))
        return len(result.succeeded)

    try:
        return run_for("$batch of 10 upserts per request", stack, seconds, step)
    finally:
        client.close()
