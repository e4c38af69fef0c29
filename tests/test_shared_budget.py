"""End to end through the local stack: a Dataverse penalty one instance meets holds back another.

Two contact worker instances (devstack/stack.py, as Flex Consumption runs each queue function on its own
instances). Dataverse answers one live write with 429 and Retry-After; the instance that met it is then
stopped, so every later event goes to the other instance, which never saw a 429 itself. That instance
sends nothing to Dataverse until the penalty is over (dataverse/budget.py: the penalty is in a Table row
every instance reads), puts its events back on the queue, and they all land afterwards.
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
RETRY_AFTER = 8  # seconds of the scripted 429


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    layout = Instances.parse("http=1,contact_worker=2,backfill_worker=1")
    with Stack(StackOptions(name="budget", lease_seconds=5, instances=layout)) as s:
        yield s


def outcomes(stack: Stack, name: str) -> list[dict[str, object]]:
    """The contact worker's outcome lines in one instance's log."""
    lines = stack.procs[name].log.read_text(errors="replace").splitlines()
    return [json.loads(line[line.index("{"):]) for line in lines if '"kind": "contact"' in line]


def test_a_429_seen_by_one_instance_holds_back_the_other(stack: Stack) -> None:
    seed_dynamics_users(stack)
    connect(stack, ACCOUNT, auto_sync=False)
    sender = WebhookSender(f"{stack.devhost_url}/api/webhooks/wave", [stack.options.webhook_secret])
    external = lambda event: "wavecnct_" + event["data"]["contact"]["id"]  # noqa: E731

    dataverse_control(stack, "POST", "faults", {"script": [
        {"kind": "status", "status": 429, "retry_after": RETRY_AFTER, "method": "PATCH", "match": "contacts("}]})
    first = wave_change(stack, ACCOUNT, {"first_name": "Ada", "last_name": "First", "email": "ada@example.com"})
    assert sender.deliver(first).status_code == 202
    first_id = first["data"]["contact"]["id"]
    met = wait_for(lambda: next((name for name in stack.instance_names("contact_worker")
                                 if any(o.get("contact_id") == first_id and o["outcome"] == "rescheduled:throttled"
                                        for o in outcomes(stack, name))), None),
                   timeout=30, what="the 429 to reach a contact worker")
    log = dataverse_control(stack, "GET", "log")
    throttled_at = max(e["t"] for e in log if e["status"] == 429)  # type: ignore[union-attr]
    stack.kill_instance(met)  # from now on only the other instance works; it never met a 429 itself
    other = next(name for name in stack.instance_names("contact_worker") if name != met)

    events = [wave_change(stack, ACCOUNT, {"first_name": "Held", "last_name": f"Back {i}",
                                           "email": f"held.{i}@example.com"}) for i in range(5)]
    for event in events:
        assert sender.deliver(event).status_code == 202
    ids = {e["data"]["contact"]["id"] for e in events}
    wait_for(lambda: ids <= {o.get("contact_id") for o in outcomes(stack, other)
                             if o["outcome"] == "rescheduled:throttled"},
             timeout=30, what="the other instance to hold back every new event")
    during = [e for e in dataverse_control(stack, "GET", "log")  # type: ignore[union-attr]
              if throttled_at < e["t"] < throttled_at + RETRY_AFTER - 0.5]
    assert during == [], f"requests sent during the penalty: {during}"

    # After the penalty every event lands, the first one too (its copy comes back to the other instance).
    wanted = {external(e) for e in [first, *events]}
    wait_for(lambda: wanted <= {r.get("externaluseridentifier") for r in dataverse_rows(stack)}, timeout=90,
             what="every event to land after the penalty")
    stack.restart_instance(met)
