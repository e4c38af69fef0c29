"""A backfill whose worker dies mid-page (SIGKILL of the Functions host while its bulk write is in
Dataverse) resumes after a restart with no duplicate and no missing contact.

The whole stack runs as separate processes (devstack/stack.py) so the host can really be killed."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import requests
from azure.storage.queue import QueueClient

from devstack.demo import connect, status
from devstack.stack import Stack, StackOptions, dataverse_control, dataverse_rows
from tests.fixtures.sync import wait_for

ACCOUNT = "acct_backfill_crash"
CONTACTS = 1200  # three pages of 500


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # A short lease: the page a killed host had taken becomes visible again within seconds.
    with Stack(StackOptions(name="backfill-crash", lease_seconds=5)) as s:
        yield s




def test_backfill_killed_mid_page_resumes_without_duplicates_or_gaps(stack: Stack) -> None:
    seeded = requests.post(f"{stack.wave_url}/_control/accounts/{ACCOUNT}/seed", json={"count": CONTACTS},
                           timeout=60)
    wave_ids = set(seeded.json()["ids"])
    # The first bulk write is held inside Dataverse until released: the host dies while it is in flight.
    dataverse_control(stack, "POST", "faults", {"script": [{"kind": "hold", "match": "CRM.UpsertMultiple",
                                                            "delay": 120}]})
    connect(stack, ACCOUNT, auto_sync=True)
    wait_for(lambda: dataverse_control(stack, "GET", "counters")["in_flight"] >= 1
             and not dataverse_control(stack, "POST", "faults", {})["pending"], 60,
             what="the page's bulk write to be in flight")
    stack.kill_devhost()
    dataverse_control(stack, "POST", "faults/release")  # the write lands; nobody records it
    landed = wait_for(lambda: dataverse_control(stack, "GET", "counters")["in_flight"] == 0
                      and len(dataverse_rows(stack)), 30, what="the held write to land")
    # the held write landed: a whole page (500) or the last one (200), whichever page's write went first
    # (pages run side by side and their bulk writes go one at a time, dataverse/budget.py in_turn); others
    # may have landed too
    assert landed >= CONTACTS - 2 * 500
    after_crash = status_after_crash(stack)["backfill"]
    # the held page never recorded its progress: the crash was mid-run
    assert after_crash["state"] == "running" and after_crash["pages"] < 3

    stack.restart_devhost(kill=False)
    final = wait_for(lambda: (s := status(stack, ACCOUNT))["backfill"]["state"] == "done" and s, 180,
                     what="the backfill to finish after the restart")
    rows = Counter(r["externaluseridentifier"] for r in dataverse_rows(stack))
    mine = {k[len("wavecnct_"):]: n for k, n in rows.items() if k and k[len("wavecnct_"):] in wave_ids}
    assert set(mine) == wave_ids, f"{len(wave_ids - set(mine))} contacts missing"
    assert set(mine.values()) == {1}, "a contact was written twice"
    assert final["backfill"]["pages"] == 3 and final["backfill"]["contacts"] == CONTACTS
    assert final["counters"]["failed"] == 0
    for name in ("backfill-pages-poison", "contact-events-poison"):
        queue = QueueClient.from_connection_string(stack.azurite.connection_string, name)
        assert queue.get_queue_properties().approximate_message_count == 0


def status_after_crash(stack: Stack) -> dict:
    """The connection status read straight from the connections table (the host is down)."""
    from core.connections import ConnectionStore
    from core.settings import StorageSettings
    from core.storage import Tables

    conn = ConnectionStore(Tables(StorageSettings(connection_string=stack.azurite.connection_string))(
        "connections")).get(ACCOUNT)
    return {"backfill": {"pages": conn.backfill.pages, "state": conn.backfill.state}}
