"""End to end through the local stack: a Dataverse penalty one instance meets holds back another.

Two contact worker instances (devstack/stack.py, as Flex Consumption runs each queue function on its own
instances) and two Wave accounts connected by the same Dataverse user, so one budget (dataverse/budget.py
keys it by org and user). Dataverse answers account A's bulk write with 429 and Retry-After; the instance
that met it is then stopped, so account B's changes go to the other instance, which never saw a 429 itself
and has no penalty of B's in memory. That instance sends nothing to Dataverse until the penalty is over
(the penalty is in a Table row every instance reads), puts B's drain back on the queue, and every change of
both accounts lands afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from devstack.demo import connect, seed_dynamics_users, wave_change
from devstack.stack import Instances, Stack, StackOptions, dataverse_control, dataverse_rows
from devstack.wave_sim import WebhookSender
from tests.fixtures.sync import wait_for

ACCOUNT = "acct_budget"
OTHER = "acct_budget_other"  # connected by the same Dataverse user as ACCOUNT
RETRY_AFTER = 8  # seconds of the scripted 429


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    layout = Instances.parse("http=1,contact_worker=2,backfill_worker=1")
    with Stack(StackOptions(name="budget", lease_seconds=5, instances=layout)) as s:
        yield s


def drains(stack: Stack, name: str) -> list[dict[str, object]]:
    """The live lane's drain outcome lines in one instance's log."""
    lines = stack.procs[name].log.read_text(errors="replace").splitlines()
    return [json.loads(line[line.index("{"):]) for line in lines if '"kind": "drain"' in line]


def held_back(stack: Stack, name: str, account: str) -> bool:
    return any(o.get("account_id") == account and o["outcome"] in ("rescheduled:throttled", "parked:throttled")
               for o in drains(stack, name))


def test_a_429_seen_by_one_instance_holds_back_the_other(stack: Stack) -> None:
    seed_dynamics_users(stack)
    connect(stack, ACCOUNT, auto_sync=False)
    connect(stack, OTHER, auto_sync=False)
    sender = WebhookSender(f"{stack.devhost_url}/api/webhooks/wave", [stack.options.webhook_secret])
    external = lambda event: "wavecnct_" + event["data"]["contact"]["id"]  # noqa: E731

    dataverse_control(stack, "POST", "faults", {"script": [
        {"kind": "status", "status": 429, "retry_after": RETRY_AFTER, "method": "POST", "match": "UpsertMultiple"}]})
    first = wave_change(stack, ACCOUNT, {"first_name": "Ada", "last_name": "First", "email": "ada@example.com"})
    assert sender.deliver(first).status_code == 202
    met = wait_for(lambda: next((name for name in stack.instance_names("contact_worker")
                                 if held_back(stack, name, ACCOUNT)), None),
                   timeout=30, what="the 429 to reach a contact worker")
    log = dataverse_control(stack, "GET", "log")
    throttled_at = max(e["t"] for e in log if e["status"] == 429)  # type: ignore[union-attr]
    stack.kill_instance(met)  # from now on only the other instance works; it never met a 429 itself
    other = next(name for name in stack.instance_names("contact_worker") if name != met)

    events = [wave_change(stack, OTHER, {"first_name": "Held", "last_name": f"Back {i}",
                                         "email": f"held.{i}@example.com"}) for i in range(5)]
    for event in events:
        assert sender.deliver(event).status_code == 202
    wait_for(lambda: held_back(stack, other, OTHER), timeout=30,
             what="the other instance to hold back the other account's changes")
    during = [e for e in dataverse_control(stack, "GET", "log")  # type: ignore[union-attr]
              if throttled_at < e["t"] < throttled_at + RETRY_AFTER - 0.5]
    assert during == [], f"requests sent during the penalty: {during}"

    # After the penalty every change lands, the first account's too (its drain comes back to the other instance).
    wanted = {external(e) for e in [first, *events]}
    wait_for(lambda: wanted <= {r.get("externaluseridentifier") for r in dataverse_rows(stack)}, timeout=90,
             what="every change to land after the penalty")
    stack.restart_instance(met)
