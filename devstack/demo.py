"""`make demo`: the main job end to end on the local stack, then a summary; exit 0 only if Dynamics = Wave.

1. starts the stack (devstack/stack.py: Azurite, Entra stand-in, Key Vault / Dataverse / Wave simulators,
   the dev host serving function_app.py), each a separate process;
2. seeds a Wave account with N contacts (--contacts, default 5,000) assigned to a few team members: two
   match enabled Dynamics users, one matches a disabled user, one exists only in Wave;
3. connects through the public connect API and the OAuth redirect chain (authorize -> callback -> Wave's
   page), auto-sync on, as the admin's browser would;
4. waits for the backfill with a progress bar (the status API);
5. sends a burst of live create/update/delete webhooks (signed by the Wave simulator's sender);
6. compares every mapped field of every contact, owners and deletions, and prints a summary table.

    python -m devstack.demo [--contacts N] [--burst N] [--instances N | http=N,queue=N,<function>=N] [--keep-running]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import requests

from devstack.stack import (
    ROOT,
    Instances,
    Stack,
    StackOptions,
    dataverse_add_user,
    dataverse_control,
    dataverse_rows,
    dataverse_users,
)
from devstack.wave_sim import WebhookSender
from sync.mapping import COLUMNS, EXTERNAL_ID_COLUMN, EXTERNAL_ID_PREFIX, contact_id, map_contact, owner_email

ACCOUNT = "acct_demo"
TRY_ACCOUNT = "acct_try"


class DemoError(RuntimeError):
    """A step of the run failed; the message says which and why."""


@dataclass(frozen=True)
class TeamMember:
    id: str
    email: str
    dynamics: str  # "enabled" | "disabled" | "absent": how the person exists in Dynamics


TEAM = (
    TeamMember("tm_alice", "alice.sales@contoso.test", "enabled"),
    TeamMember("tm_bob", "Bob.Sales@Contoso.test", "enabled"),  # case differs from Dynamics on purpose
    TeamMember("tm_carol", "carol.left@contoso.test", "disabled"),
    TeamMember("tm_dave", "dave.wave-only@fabrikam.test", "absent"),
)


# -- talking to the stack -----------------------------------------------------------------------------


def connections_api(stack: Stack, account: str, action: str = "", method: str = "GET",
                    body: dict[str, Any] | None = None) -> requests.Response:
    url = f"{stack.devhost_url}/api/connections/{account}{'/' + action if action else ''}"
    return requests.request(method, url, json=body, headers={"x-functions-key": stack.function_key}, timeout=30)


def status(stack: Stack, account: str) -> dict[str, Any]:
    res = connections_api(stack, account)
    if res.status_code != 200:
        raise DemoError(f"status API answered {res.status_code}: {res.text[:300]}")
    return res.json()


def connect(stack: Stack, account: str, *, auto_sync: bool = True, plan: str = "teams",
            initiated_by: str = "admin@wave.test") -> dict[str, Any]:
    """What Wave's backend and the admin's browser do: the connect API, the redirect chain a browser follows
    (authorize on the Entra stand-in -> callback -> Wave's page with a completion code), then the confirm
    API for the same Wave user. Returns the confirmed connection's status."""
    res = connections_api(stack, account, "connect", "POST", {
        "instance_url": stack.dataverse_url, "auto_sync": auto_sync, "plan": plan,
        "initiated_by": initiated_by, "return_url": stack.admin_page_url(account),
    })
    if res.status_code != 200:
        raise DemoError(f"connect API answered {res.status_code}: {res.text[:300]}")
    url = res.json()["authorize_url"]
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would override verify
    session.verify = str(stack.certs.bundle) if stack.certs else True
    for _ in range(10):  # authorize (Entra stand-in) -> callback (dev host) -> Wave's page
        if url.startswith(stack.admin_page_url(account)):
            outcome = parse_qs(urlsplit(url).query)
            if outcome.get("dynamics") != ["confirm"] or not outcome.get("completion"):
                raise DemoError(f"sign-in ended with {url}")
            done = connections_api(stack, account, "confirm", "POST",
                                   {"completion": outcome["completion"][0], "confirmed_by": initiated_by})
            if done.status_code != 200:
                raise DemoError(f"confirm API answered {done.status_code}: {done.text[:300]}")
            return done.json()
        hop = session.get(url, allow_redirects=False, timeout=30)
        if hop.status_code not in (301, 302, 303, 307, 308):
            raise DemoError(f"sign-in stopped at {urlsplit(url).path}: HTTP {hop.status_code} {hop.text[:300]}")
        url = requests.compat.urljoin(url, hop.headers["Location"])
    raise DemoError("sign-in redirected too many times")


def wait_for_backfill(stack: Stack, account: str, total: int, timeout: float, show: bool = True
                      ) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    bar = ProgressBar(total) if show else None
    try:
        while time.monotonic() < deadline:
            stack.check_alive()
            last = status(stack, account)
            backfill = last.get("backfill") or {}
            if bar:
                bar.update(int(backfill.get("contacts") or 0), backfill.get("state", "?"))
            if backfill.get("state") in ("done", "failed"):
                return last
            time.sleep(0.25)
    finally:
        if bar:
            bar.close()
    raise DemoError(f"backfill did not finish within {timeout:.0f} s (last status: {last})")


class ProgressBar:
    """Redrawn in place on a terminal; one line per tenth (and per state change) otherwise."""

    def __init__(self, total: int, width: int = 40) -> None:
        self.total, self.width = total, width
        self.tty = sys.stdout.isatty()
        self.shown: tuple[int, str] | None = None

    def update(self, done: int, state: str) -> None:
        share = min(1.0, done / self.total) if self.total else 1.0
        key = (int(share * (100 if self.tty else 10)), state)
        if key == self.shown:
            return
        self.shown = key
        filled = int(share * self.width)
        line = f"  backfill [{'#' * filled}{'.' * (self.width - filled)}] {done:>6}/{self.total} {state:<8}"
        print(f"\r{line}" if self.tty else line, end="" if self.tty else "\n", flush=True)

    def close(self) -> None:
        if self.tty:
            print()


def wave_state(stack: Stack, account: str) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """Every live Wave contact by id, and the ids deleted in Wave (with the delete's version)."""
    res = requests.get(f"{stack.wave_url}/_control/accounts/{account}/contacts", timeout=60)
    res.raise_for_status()
    doc = res.json()
    return {c["id"]: c for c in doc["contacts"]}, {d["id"]: d["version"] for d in doc["deleted"]}


def wave_populate(stack: Stack, account: str, count: int, seed: int = 1) -> None:
    members = [{"id": m.id, "email": m.email} for m in TEAM] + [None]
    res = requests.post(f"{stack.wave_url}/_control/accounts/{account}/populate",
                        json={"count": count, "team_members": members, "seed": seed}, timeout=120)
    res.raise_for_status()


def wave_change(stack: Stack, account: str, doc: dict[str, Any]) -> dict[str, Any]:
    """Create or update a contact in Wave without sending its webhook; returns the event."""
    res = requests.post(f"{stack.wave_url}/_control/accounts/{account}/contacts", json=doc, timeout=30)
    res.raise_for_status()
    return res.json()["event"]


def wave_delete(stack: Stack, account: str, contact_id: str) -> dict[str, Any]:
    res = requests.delete(f"{stack.wave_url}/_control/accounts/{account}/contacts/{contact_id}", timeout=30)
    res.raise_for_status()
    return res.json()["event"]


# -- comparing Dynamics with Wave ---------------------------------------------------------------------


@dataclass
class Comparison:
    wave_contacts: int = 0
    wave_deleted: int = 0
    dynamics_rows: int = 0  # rows carrying a wavecnct_ external id
    duplicates: int = 0  # external ids with more than one row
    missing: list[str] = field(default_factory=list)  # live in Wave, no row
    resurrected: list[str] = field(default_factory=list)  # deleted in Wave, row still there
    unknown: list[str] = field(default_factory=list)  # a row for an id Wave never had
    mismatched: list[str] = field(default_factory=list)  # "<id>: <column> wave=... dynamics=..."
    owners_assigned: int = 0  # rows owned by the team member's Dynamics user
    owner_errors: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not (self.duplicates or self.missing or self.resurrected or self.unknown or self.mismatched
                    or self.owner_errors)

    def problems(self, limit: int = 5) -> list[str]:
        out = []
        for name in ("missing", "resurrected", "unknown", "mismatched", "owner_errors"):
            items = getattr(self, name)
            if items:
                out.append(f"{name}: {len(items)} e.g. {items[:limit]}")
        if self.duplicates:
            out.append(f"duplicates: {self.duplicates}")
        return out


def expected_owner(contact: dict[str, Any], users: list[dict[str, Any]]) -> str | None:
    """The enabled Dynamics user whose email matches the assigned team member (case-insensitive), or None."""
    email = owner_email(contact)
    if not email:
        return None
    for user in users:
        if (user.get("internalemailaddress") or "").lower() == email.lower() and not user.get("isdisabled"):
            return user["systemuserid"]
    return None


def compare(wave: dict[str, dict[str, Any]], deleted: dict[str, int], rows: list[dict[str, Any]],
            users: list[dict[str, Any]]) -> Comparison:
    """Every mapped column of every live contact, its owner, and the absence of every deleted one."""
    result = Comparison(wave_contacts=len(wave), wave_deleted=len(deleted))
    disabled = {u["systemuserid"].lower() for u in users if u.get("isdisabled")}
    by_external: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        ext = row.get(EXTERNAL_ID_COLUMN) or ""
        if ext.startswith(EXTERNAL_ID_PREFIX):
            by_external.setdefault(ext, []).append(row)
    result.dynamics_rows = sum(len(v) for v in by_external.values())
    result.duplicates = sum(len(v) - 1 for v in by_external.values() if len(v) > 1)
    for wave_id, contact in wave.items():
        found = by_external.get(EXTERNAL_ID_PREFIX + wave_id)
        if not found:
            result.missing.append(wave_id)
            continue
        row = found[0]
        owner = expected_owner(contact, users)
        payload = map_contact(contact, owner).payload
        for col in COLUMNS:
            if (row.get(col.column) or None) != payload[col.column]:
                result.mismatched.append(
                    f"{wave_id}: {col.column} wave={payload[col.column]!r} dynamics={row.get(col.column)!r}")
        current = (row.get("_ownerid_value") or "").lower()
        if owner is not None:
            if current == owner.lower():
                result.owners_assigned += 1
            else:
                result.owner_errors.append(f"{wave_id}: owner {current} expected {owner}")
        elif current in disabled:
            result.owner_errors.append(f"{wave_id}: owned by disabled user {current}")
    for wave_id in deleted:
        if EXTERNAL_ID_PREFIX + wave_id in by_external:
            result.resurrected.append(wave_id)
    known = {EXTERNAL_ID_PREFIX + i for i in (*wave, *deleted)}
    result.unknown = sorted(ext for ext in by_external if ext not in known)
    return result


# -- the live burst -----------------------------------------------------------------------------------


@dataclass
class Burst:
    events: list[dict[str, Any]]
    sent_at: dict[str, float] = field(default_factory=dict)  # "<contact id>@<version>" -> time.time() of the post
    statuses: Counter = field(default_factory=Counter)


def make_burst(stack: Stack, account: str, size: int, rng: random.Random) -> list[dict[str, Any]]:
    """About half updates, a quarter creates and a quarter deletes of the account's contacts, in Wave."""
    live, _ = wave_state(stack, account)
    ids = sorted(live)
    rng.shuffle(ids)
    members = [{"id": m.id, "email": m.email} for m in TEAM] + [None]
    events = []
    for i in range(size):
        kind = ("update", "update", "create", "delete")[i % 4]
        if kind == "create" or not ids:
            events.append(wave_change(stack, account, {
                "first_name": "Live", "last_name": f"Contact {i}", "email": f"live.{i}@example.com",
                "company": "Burst Ltd", "assigned_team_member": rng.choice(members)}))
        elif kind == "update":
            events.append(wave_change(stack, account, {
                "id": ids.pop(), "job_title": f"Updated title {i}", "phone": None,
                "note": f"changed live ({i})", "assigned_team_member": rng.choice(members)}))
        else:
            events.append(wave_delete(stack, account, ids.pop()))
    return events


def event_key(event: dict[str, Any]) -> str:
    contact = event["data"]["contact"]
    return f"{contact['id']}@{contact['version']}"


def deliver(sender: WebhookSender, events: list[dict[str, Any]], burst: Burst, threads: int = 8) -> None:
    def post(event: dict[str, Any]) -> None:
        burst.sent_at.setdefault(event_key(event), time.time())
        burst.statuses[sender.post(event)] += 1

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(post, events))


def watch_latencies(stack: Stack, account: str, burst: Burst, timeout: float) -> dict[str, float]:
    """Time from posting each contact's last burst event to the first successful Dataverse write of that
    contact after it, read from the simulator's request log (both clocks are this machine's wall clock).

    A write is recognised by the row's contactid (known rows, or the deterministic id of a new one) or by
    its external id (alternate-key URL) in the request path, or among the rows of a bulk write. Only the last
    event per contact is measured: an earlier one is overwritten before it could be observed.
    """
    ids = {r.get(EXTERNAL_ID_COLUMN): r["contactid"] for r in dataverse_rows(stack) if r.get(EXTERNAL_ID_COLUMN)}
    final: dict[str, dict[str, Any]] = {e["data"]["contact"]["id"]: e for e in burst.events}
    needles: dict[str, tuple[str, ...]] = {}
    for wave_id in final:
        ext = EXTERNAL_ID_PREFIX + wave_id
        needles[wave_id] = tuple({ids.get(ext) or contact_id(account, wave_id), contact_id(account, wave_id), ext})
    latencies: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    seen_until = 0.0
    while len(latencies) < len(final) and time.monotonic() < deadline:
        stack.check_alive()
        log = dataverse_control(stack, "GET", "log?limit=5000")
        for entry in log:  # type: ignore[union-attr]
            if entry["t"] <= seen_until or not 200 <= entry["status"] < 300 or entry["method"] == "GET":
                continue
            path = unquote(entry["path"])
            written = set(entry.get("ids") or ())  # a bulk write's rows (UpsertMultiple)
            for wave_id, event in final.items():
                key = event_key(event)
                sent = burst.sent_at.get(key)
                if key in latencies or sent is None or entry["t"] < sent:
                    continue
                if any(n in path for n in needles[wave_id]) or any(n in written for n in needles[wave_id]):
                    latencies[key] = entry["t"] - sent
        if log:
            seen_until = max(seen_until, max(e["t"] for e in log) - 2.0)  # type: ignore[union-attr]
        time.sleep(0.1)
    return latencies


def wait_until_equal(stack: Stack, account: str, timeout: float) -> Comparison:
    """Compare until Dynamics equals Wave or the deadline passes; the last comparison either way."""
    deadline = time.monotonic() + timeout
    while True:
        wave, deleted = wave_state(stack, account)
        result = compare(wave, deleted, dataverse_rows(stack), dataverse_users(stack))
        if result.equal or time.monotonic() > deadline:
            return result
        stack.check_alive()
        time.sleep(0.5)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least q% of the values at or below it."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1]


# -- the run ------------------------------------------------------------------------------------------


@dataclass
class Summary:
    comparison: Comparison
    backfill_seconds: float
    backfill_contacts: int
    latencies: list[float]
    webhook_statuses: Counter
    status: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.comparison.equal


def seed_dynamics_users(stack: Stack) -> None:
    for m in TEAM:
        if m.dynamics != "absent":
            dataverse_add_user(stack, m.email.lower(), f"{m.id} (Dynamics)", disabled=m.dynamics == "disabled")


def run(stack: Stack, *, contacts: int, burst_size: int, seed: int = 7, show: bool = True,
        account: str = ACCOUNT) -> Summary:
    say = print if show else (lambda *a, **k: None)
    rng = random.Random(seed)
    seed_dynamics_users(stack)
    wave_populate(stack, account, contacts, seed=seed)
    say(f"Wave account {account}: {contacts} contacts, team members {', '.join(m.email for m in TEAM)}")

    started = time.monotonic()
    connect(stack, account)
    say(f"connected {account} to {stack.dataverse_url} (auto-sync on); importing existing contacts")
    final = wait_for_backfill(stack, account, contacts, timeout=max(120.0, contacts / 10), show=show)
    backfill_seconds = time.monotonic() - started
    if final["backfill"]["state"] != "done":
        raise DemoError(f"backfill ended {final['backfill']['state']}: {final}")

    say(f"sending a burst of {burst_size} live webhooks (creates, updates, deletes)")
    events = make_burst(stack, account, burst_size, rng)
    burst = Burst(events)
    sender = WebhookSender(f"{stack.devhost_url}/api/webhooks/wave", [stack.options.webhook_secret])
    deliver(sender, events, burst)
    latencies = watch_latencies(stack, account, burst, timeout=120)
    wait_until_equal(stack, account, timeout=60)

    wave, deleted = wave_state(stack, account)
    comparison = compare(wave, deleted, dataverse_rows(stack), dataverse_users(stack))
    return Summary(comparison, backfill_seconds, contacts, list(latencies.values()), burst.statuses,
                   status(stack, account))


def print_summary(s: Summary) -> None:
    c = s.comparison
    failures = Counter(f.get("category", "?") for f in (s.status.get("failures") or []))
    counters = s.status.get("counters") or {}
    lat = sorted(s.latencies)
    rows = [
        ("Wave contacts (live)", f"{c.wave_contacts}"),
        ("Wave contacts deleted", f"{c.wave_deleted}"),
        ("Dynamics rows (wavecnct_*)", f"{c.dynamics_rows}"),
        ("Duplicates", f"{c.duplicates}"),
        ("Missing / resurrected / unknown", f"{len(c.missing)} / {len(c.resurrected)} / {len(c.unknown)}"),
        ("Field mismatches", f"{len(c.mismatched)}"),
        ("Owners assigned (matched users)", f"{c.owners_assigned}"),
        ("Owner errors", f"{len(c.owner_errors)}"),
        ("Counters synced/deleted/failed/skipped",
         "/".join(str(counters.get(k, 0)) for k in ("synced", "deleted", "failed", "skipped"))),
        ("Failures by reason", ", ".join(f"{k}: {v}" for k, v in sorted(failures.items())) or "none"),
        ("Backfill time", f"{s.backfill_seconds:.1f} s (connect to done)"),
        ("Backfill throughput", f"{s.backfill_contacts / s.backfill_seconds:.0f} contacts/s"),
        ("Live webhooks answered", ", ".join(f"{k}: {v}" for k, v in sorted(s.webhook_statuses.items()))),
        ("Live latency p50 / p95", f"{percentile(lat, 50) * 1000:.0f} ms / {percentile(lat, 95) * 1000:.0f} ms "
                                   f"({len(lat)} events measured)"),
        ("Dynamics = Wave", "YES" if s.ok else "NO"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    print(f"  {'':-<{width}}-+-{'':-<40}")
    for key, value in rows:
        print(f"  {key:<{width}} | {value}")
    print(f"  {'':-<{width}}-+-{'':-<40}")
    for problem in c.problems():
        print(f"  PROBLEM {problem}")


def key_file(stack: Stack) -> Path:
    """The run's function key in a file only this user can read (never printed)."""
    path = stack.dir / "function-key"
    path.touch(mode=0o600)
    path.write_text(stack.function_key + "\n")
    return path


def instances_arg(text: str) -> Instances:
    """--instances for argparse: a malformed spec is a usage error naming the part."""
    try:
        return Instances.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the Wave -> Dynamics 365 sync on the local stack.")
    parser.add_argument("--contacts", type=int, default=5000, help="contacts seeded in Wave (default 5000)")
    parser.add_argument("--burst", type=int, default=200, help="live webhooks sent after the backfill")
    parser.add_argument("--instances", type=instances_arg, default=Instances(), metavar="SPEC",
                        help="app instances: N per queue function (default 1, one HTTP instance), or "
                             "http=N,queue=N,<function>=N")
    parser.add_argument("--keep-running", action="store_true", help="leave the stack running until Ctrl-C")
    args = parser.parse_args(argv)

    print(f"starting the local stack ({args.instances})")
    with Stack(StackOptions(name="demo", instances=args.instances)) as stack:
        print(f"  logs       {stack.dir.relative_to(ROOT)}/")
        print(f"  dev host   {stack.devhost_url}/api/   instances: {', '.join(stack.instance_names())}")
        print(f"  admin page {stack.admin_page_url(ACCOUNT)}")
        print(f"  Dataverse  {stack.dataverse_url}   Wave {stack.wave_url}   Entra {stack.entra_authority}")
        try:
            summary = run(stack, contacts=args.contacts, burst_size=args.burst)
        except DemoError as exc:
            print(f"\ndemo failed: {exc}", file=sys.stderr)
            return 1
        print_summary(summary)
        if args.keep_running:
            wave_populate(stack, TRY_ACCOUNT, 250, seed=2)
            print(f"\nthe stack keeps running (Ctrl-C stops it); sign in to Wave's pages as admin@wave.test:\n"
                  f"  {stack.admin_page_url(ACCOUNT)}   the account the demo connected\n"
                  f"  {stack.admin_page_url(TRY_ACCOUNT)}   250 contacts, not connected: connect it yourself\n"
                  f"    (instance URL {stack.dataverse_url}; the browser will warn about the local test CA)\n"
                  f"  {stack.devhost_url}/api/connections/{ACCOUNT}   with header x-functions-key: the key in "
                  f"{key_file(stack)}")
            with contextlib.suppress(KeyboardInterrupt):
                threading.Event().wait()
        return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
