"""Tenants stay apart in one Dynamics org (sync/holds.py): a row another Wave account holds there is never
written or deleted by this one, and the contact is recorded as a `conflict`; a row nobody holds yet is adopted.

Pure rules first (no I/O), then the hold table on Azurite, then the workers of two accounts on one
simulated org, then the same end to end: two accounts connected through the connect flow to the one
Dataverse simulator, with webhooks and a backfill through the dev host."""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from typing import Any

import pytest

from core.connections import CONNECTED, Connection, ConnectionStore
from core.failures import CATEGORIES, FailureStore
from dataverse.client import DataverseClient
from sync import backfill, outcomes, worker
from sync.context import SyncContext
from sync.holds import (
    TABLE,
    Claim,
    HeldElsewhere,
    HoldStore,
    conflict_reason,
    held_elsewhere,
    hold_partition,
    org_key,
)
from sync.mapping import contact_id
from sync.messages import ContactMessage, PageMessage
from sync.owners import TABLE as OWNERS
from sync.owners import OwnerCache
from sync.state import SNAPSHOTS, STATE, ContactStateStore, SnapshotStore
from sync.wave_api import Page
from tests.fixtures.dataverse import SimTokens
from tests.fixtures.sync import SyncAccount, connect_sync_account, wait_for

# -- pure rules -------------------------------------------------------------------------------------


def test_org_key_is_one_for_every_spelling_of_an_org_and_differs_between_orgs():
    same = ["https://contoso.crm.dynamics.com", "https://Contoso.CRM.dynamics.com/", "https://contoso.api.crm.dynamics.com",
            "https://contoso.crm.dynamics.com.", "https://contoso.crm.dynamics.com:443"]
    assert {org_key(url) for url in same} == {"contoso.crm.dynamics.com"}
    others = ["https://contoso.crm4.dynamics.com", "https://contoso2.crm.dynamics.com",
              "https://contoso.crm.microsoftdynamics.us", "https://127.0.0.1:8443"]
    assert len({org_key(url) for url in others} | {"contoso.crm.dynamics.com"}) == 5
    assert org_key("https://gov.api.crm.microsoftdynamics.us") == "gov.crm.microsoftdynamics.us"
    assert org_key("https://127.0.0.1:8443") == "127.0.0.1:8443"  # a development host keeps its port
    with pytest.raises(ValueError):
        org_key("https://")


def test_hold_partition_is_the_orgs_and_ignores_the_case_of_the_contactid():
    row = "7D1C2A9E-0000-4000-8000-0000000000AA"
    assert hold_partition("a.crm.dynamics.com", row) == hold_partition("a.crm.dynamics.com", row.lower())
    parts = {hold_partition("a.crm.dynamics.com", str(uuid.uuid4())) for _ in range(400)}
    assert len(parts) == 8 and all(p.startswith("a.crm.dynamics.com~") for p in parts)
    assert not parts & {hold_partition("b.crm.dynamics.com", str(uuid.uuid4())) for _ in range(400)}


def test_only_another_accounts_hold_refuses():
    assert held_elsewhere("acct_a", "acct_b")
    assert not held_elsewhere("acct_a", "acct_a")


def test_a_conflict_is_a_customer_visible_category_with_a_reason_that_names_the_contact_only():
    error = HeldElsewhere("c_42")
    assert outcomes.failure_category(error) == "conflict" and "conflict" in CATEGORIES
    assert outcomes.readable(error) == conflict_reason("c_42")
    assert "wavecnct_c_42" in conflict_reason("c_42") and "left that row unchanged" in conflict_reason("c_42")
    assert "did not delete or deactivate" in conflict_reason("c_42", deleting=True)


# -- the hold table (Azurite) ---------------------------------------------------------------------------

@pytest.fixture
def holds(tables) -> HoldStore:
    return HoldStore(tables(TABLE))


def _org() -> str:
    return f"org{uuid.uuid4().hex[:10]}.crm.dynamics.com"


def test_racing_claims_of_one_row_by_two_accounts_have_exactly_one_winner(holds):
    org, row = _org(), str(uuid.uuid4())
    answers: list[tuple[str, str]] = []
    start = threading.Barrier(16)

    def claim(account: str) -> None:
        start.wait()
        answers.append((account, holds.claim(org, account, Claim(row, "c_1"))))

    threads = [threading.Thread(target=claim, args=(f"acct_{i % 2}",)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    holders = {holder for _, holder in answers}
    assert len(answers) == 16 and len(holders) == 1  # every caller is told the same single winner
    assert holds.claim(org, "acct_0", Claim(row.upper(), "c_1")) == holders.pop()


def test_claim_many_claims_fresh_rows_and_reports_the_holders_of_taken_ones(holds):
    org = _org()
    mine = [Claim(str(uuid.uuid4()), f"c_{i}") for i in range(900)]  # > 100 in each of the 8 partitions
    assert holds.claim_many(org, "acct_a", mine) == {c.dynamics_id: "acct_a" for c in mine}
    assert holds.claim_many(org, "acct_a", mine[:300]) == {c.dynamics_id: "acct_a" for c in mine[:300]}  # a rerun
    fresh = [Claim(str(uuid.uuid4()), f"c_new{i}") for i in range(5)]
    got = holds.claim_many(org, "acct_b", [*mine[:3], *fresh, mine[0]])
    assert got == {**{c.dynamics_id: "acct_a" for c in mine[:3]}, **{c.dynamics_id: "acct_b" for c in fresh}}
    # the same rows in another org are free
    assert set(holds.claim_many(_org(), "acct_b", mine[:3]).values()) == {"acct_b"}


# -- the workers of two accounts on one simulated org ---------------------------------------------

@dataclass
class NoQueues:
    sent: list[tuple[str, dict[str, Any], int]]

    def send(self, queue_name: str, message: dict[str, Any], *, delay_seconds: int = 0) -> None:
        self.sent.append((queue_name, message, delay_seconds))


@dataclass
class OnePage:
    contacts: list[dict[str, Any]]

    def contacts_page(self, account_id: str, cursor: str | None, limit: int = 500) -> Page:
        return Page(self.contacts, None)


def _context(tables, client: DataverseClient, org_url: str, delete_policy: str = "delete") -> SyncContext:
    account = f"acct_t_{uuid.uuid4().hex[:10]}"
    connections = ConnectionStore(tables("connections"))
    connections.save(Connection(account_id=account, state=CONNECTED, generation="gen1", instance_url=org_url,
                                delete_policy=delete_policy))
    ctx = SyncContext(connections=connections, failures=FailureStore(tables("failures")),
                      snapshots=SnapshotStore(tables(SNAPSHOTS)), states=ContactStateStore(tables(STATE)),
                      owners=OwnerCache(tables(OWNERS)), queues=NoQueues([]),  # type: ignore[arg-type]
                      holds=HoldStore(tables(TABLE)), dataverse=lambda conn: client)
    ctx.account = account  # type: ignore[attr-defined]
    return ctx


@pytest.fixture
def two(tables, dataverse_client) -> tuple[SyncContext, SyncContext]:
    """Accounts A and B connected to one org (the simulator), the second spelling its URL differently."""
    org = _org()
    return (_context(tables, dataverse_client, f"https://{org}"),
            _context(tables, dataverse_client, f"https://{org.replace('.crm.', '.api.crm.', 1)}/"))


def _put(ctx: SyncContext, cid: str, version: int, deleted: bool = False, **fields: Any) -> ContactMessage:
    contact = {"id": cid, "version": version, **fields}
    ctx.snapshots.put_if_newer(ctx.account, contact, deleted=deleted, event_id=f"evt_{uuid.uuid4().hex}")
    return ContactMessage(ctx.account, cid, version, "gen1")


def _rows(sim, cid: str) -> list[dict]:
    return sim.contacts_by_external_id(f"wavecnct_{cid}")


def test_the_second_account_never_updates_or_deletes_the_first_accounts_row(two, dataverse_sim):
    a, b = two
    assert worker.process(a, _put(a, "c_same", 1, first_name="A's")) == "synced"
    [row] = _rows(dataverse_sim, "c_same")
    assert worker.process(b, _put(b, "c_same", 1, first_name="B's")) == "failed:conflict"
    assert _rows(dataverse_sim, "c_same") == [row]  # not a column, not the version, changed
    [failure] = list(b.failures.all(b.account))
    assert failure.category == "conflict" and "wavecnct_c_same" in failure.reason and a.account not in failure.reason
    assert b.connections.counters(b.account, "gen1").failed == 1
    for policy in ("delete", "deactivate"):  # B's Wave contact is deleted: A's row stays, active
        b.connections.update(b.account, lambda c, p=policy: setattr(c, "delete_policy", p))
        assert worker.process(b, _put(b, "c_same", 2 if policy == "delete" else 3, deleted=True)) == "failed:conflict"
        assert _rows(dataverse_sim, "c_same") == [row]
    assert "did not delete" in next(b.failures.all(b.account)).reason
    assert worker.process(a, _put(a, "c_same", 2, first_name="A's v2")) == "synced"  # A's own row stays A's
    assert _rows(dataverse_sim, "c_same")[0]["firstname"] == "A's v2"


def test_a_row_nobody_holds_is_adopted_and_then_held(two, dataverse_sim, dataverse_client):
    a, b = two
    imported = str(uuid.uuid4())  # a row made before the integration, e.g. a CSV import of Wave contacts
    dataverse_client.upsert_contact(imported, {"externaluseridentifier": "wavecnct_c_csv", "firstname": "CSV"})
    assert worker.process(b, _put(b, "c_csv", 1, first_name="B's")) == "synced"
    [row] = _rows(dataverse_sim, "c_csv")
    assert (row["contactid"], row["firstname"]) == (imported, "B's")
    assert worker.process(a, _put(a, "c_csv", 1, first_name="A's")) == "failed:conflict"
    assert _rows(dataverse_sim, "c_csv")[0]["firstname"] == "B's"


def test_a_delete_of_a_row_nobody_holds_claims_it_first(two, dataverse_sim, dataverse_client):
    a, b = two
    imported = str(uuid.uuid4())
    dataverse_client.upsert_contact(imported, {"externaluseridentifier": "wavecnct_c_gone", "firstname": "CSV"})
    assert worker.process(a, _put(a, "c_gone", 3, deleted=True)) == "deleted"
    assert _rows(dataverse_sim, "c_gone") == []
    assert a.holds.claim(org_key(a.connections.get(a.account).instance_url), b.account,
                         Claim(imported, "c_gone")) == a.account


def test_two_accounts_adopting_one_row_at_once_exactly_one_wins(two, dataverse_sim, dataverse_client):
    imported = str(uuid.uuid4())
    dataverse_client.upsert_contact(imported, {"externaluseridentifier": "wavecnct_c_both", "firstname": "CSV"})
    messages = [(ctx, _put(ctx, "c_both", 1, first_name=f"by {i}")) for i, ctx in enumerate(two)]
    outcomes: dict[int, str] = {}
    start = threading.Barrier(2)

    def run(i: int) -> None:
        start.wait()
        outcomes[i] = worker.process(*messages[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes.values()) == ["failed:conflict", "synced"]
    winner = next(i for i, outcome in outcomes.items() if outcome == "synced")
    [row] = _rows(dataverse_sim, "c_both")
    assert (row["contactid"], row["firstname"]) == (imported, f"by {winner}")


def test_a_backfill_page_claims_its_rows_and_leaves_anothers_alone(two, dataverse_sim, dataverse_client):
    a, b = two
    assert worker.process(a, _put(a, "c_bf2", 1, first_name="A's")) == "synced"
    held = _rows(dataverse_sim, "c_bf2")
    imported = str(uuid.uuid4())
    dataverse_client.upsert_contact(imported, {"externaluseridentifier": "wavecnct_c_bf4", "firstname": "CSV"})
    run_id = backfill.start_backfill(b.connections, b.queues, b.account)
    b.wave = OnePage([{"id": f"c_bf{i}", "version": 1, "first_name": f"B{i}"} for i in range(6)])  # type: ignore
    result, report = backfill.run_page(b, PageMessage(b.account, "gen1", run_id, None, 1))
    assert result == "done" and (report.written, report.failed) == (5, 1)
    assert _rows(dataverse_sim, "c_bf2") == held
    assert [r["contactid"] for r in _rows(dataverse_sim, "c_bf4")] == [imported]  # adopted
    assert _rows(dataverse_sim, "c_bf0")[0]["contactid"] == contact_id(b.account, "c_bf0")
    [failure] = list(b.failures.all(b.account))
    assert failure.contact_id == "c_bf2" and failure.category == "conflict"
    assert b.states.get(b.account, "c_bf2").last_result == "failed:conflict"
    assert b.snapshots.get(b.account, "c_bf2").version == 1  # kept for failures/retry
    # the rows B's backfill made are B's: A's contact of the same id is now the conflict
    assert worker.process(a, _put(a, "c_bf0", 1, first_name="A's")) == "failed:conflict"


# -- end to end: two accounts connected to one org through the public surfaces --------------------------

def _import_row(acct: SyncAccount, wave_id: str, **columns: Any) -> str:
    """A row made before any account synced it (say, a CSV import), through the simulator's Web API."""
    sim, certs = acct.identity.dataverse, acct.identity.certs
    row = str(uuid.uuid4())
    with DataverseClient(sim.url, SimTokens(audience=sim.url), verify=str(certs.bundle)) as client:
        client.upsert_contact(row, {"externaluseridentifier": f"wavecnct_{wave_id}", **columns})
    return row


def _failures(acct: SyncAccount, count: int) -> dict[str, dict]:
    found = wait_for(lambda: len(f := acct.status()["failures"]) >= count and f, 60, what=f"{count} failures")
    return {f["contact_id"]: f for f in found}


def test_two_accounts_one_org_the_second_is_a_conflict_and_the_first_row_never_changes(
        devhost, identity, wave, sync_queues, fresh_entra):
    a = connect_sync_account(devhost, identity, wave, sync_queues)
    b = connect_sync_account(devhost, identity, wave, sync_queues)
    shared = f"c_shared_{uuid.uuid4().hex[:8]}"
    wave.send([wave.create_contact(a.account_id, id=shared, first_name="Ada", email="ada@a.example")])
    first = wait_for(lambda: a.row(shared), 60, what="A's row")

    # B has a contact with the same Wave id: its create and then its delete are refused
    assert wave.send([wave.create_contact(b.account_id, id=shared, first_name="Bob")]) == [202]
    failure = _failures(b, 1)[shared]
    assert failure["category"] == "conflict" and f"wavecnct_{shared}" in failure["reason"]
    assert a.account_id not in failure["reason"]
    assert wave.send([wave.delete_contact(b.account_id, shared)]) == [202]
    wait_for(lambda: "did not delete" in _failures(b, 1)[shared]["reason"], 60, what="the refused delete")
    b.drained()
    assert a.rows(shared) == [first]  # every column, modifiedon and versionnumber as A left them
    assert b.status()["counters"]["failed"] == 2 and b.poison()["contact-events-poison"] == 0

    # a backfill of B: a Wave id A holds is a conflict; a row nobody held yet (imported) is adopted
    imported_id = f"c_csv_{uuid.uuid4().hex[:8]}"
    imported = _import_row(b, imported_id, firstname="Imported")
    wave.create_contact(b.account_id, id=shared, first_name="Bob again")
    wave.create_contact(b.account_id, id=imported_id, first_name="Cleo")
    started = b.api("POST", "/sync")
    assert started.status_code == 202, started.text
    done = wait_for(lambda: (s := b.status())["backfill"]["state"] in ("done", "failed") and s, 120,
                    what="B's backfill")
    assert done["backfill"]["state"] == "done"
    assert a.rows(shared) == [first]
    assert [(r["contactid"], r["firstname"]) for r in b.rows(imported_id)] == [(imported, "Cleo")]
    assert {f["contact_id"]: f["category"] for f in done["failures"]} == {shared: "conflict"}

    # A's own contact still syncs, update and delete alike
    wave.send([wave.update_contact(a.account_id, shared, first_name="Ada v2")])
    wait_for(lambda: (r := a.row(shared)) and r["firstname"] == "Ada v2", 60, what="A's update")
    wave.send([wave.delete_contact(a.account_id, shared)])
    wait_for(lambda: not a.rows(shared), 60, what="A's delete")
