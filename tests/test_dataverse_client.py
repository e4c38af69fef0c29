"""dataverse.client.DataverseClient against the simulator: every operation and every error class."""

from __future__ import annotations

import threading

import pytest

from dataverse.client import ContactRef, DataverseClient, UpsertItem
from dataverse.errors import (
    AuthExpired,
    Conflict,
    DataverseError,
    NotFound,
    PermissionDenied,
    Throttled,
    Transient,
    ValidationFailed,
)
from devstack.dataverse_sim import DataverseSimulator, Fault, Limits
from sync.mapping import contact_id, external_id, map_contact
from sync.rules import pick_row
from tests.fixtures.dataverse import ADMIN_OID, SimTokens, make_token

ACCOUNT = "acct_test"


def wave(wave_id: str, **fields) -> dict:
    return {"id": wave_id, "first_name": "Ada", "last_name": f"Last {wave_id}", "email": f"{wave_id}@example.com",
            **fields}


def item(wave_id: str, owner: str | None = None, **fields) -> UpsertItem:
    return UpsertItem(wave_id, contact_id(ACCOUNT, wave_id), map_contact(wave(wave_id, **fields), owner).payload)


# -- identity, privileges, dop hint --------------------------------------------------------------------------


def test_whoami_and_dop_hint(dataverse_sim: DataverseSimulator, dataverse_client: DataverseClient) -> None:
    dataverse_sim.configure(dop_hint=6)
    assert dataverse_client.dop_hint is None
    me = dataverse_client.whoami()
    assert me.user_id in {u["systemuserid"] for u in dataverse_sim.rows("systemusers")}
    assert me.business_unit_id and me.organization_id
    assert dataverse_client.dop_hint == 6


def test_retrieve_user_privileges(dataverse_sim: DataverseSimulator, dataverse_client: DataverseClient) -> None:
    rep = dataverse_sim.add_user("rep@contoso.test", privileges={"prvReadContact", "prvCreateContact"})
    assert dataverse_client.retrieve_user_privileges(rep["systemuserid"]) == {"prvReadContact", "prvCreateContact"}
    me = dataverse_client.whoami().user_id
    assert {"prvCreateContact", "prvWriteContact", "prvAssignContact", "prvReadUser"} <= (
        dataverse_client.retrieve_user_privileges(me))


def test_https_with_ca_bundle(dataverse_https_sim: DataverseSimulator, test_certs) -> None:
    client = DataverseClient(dataverse_https_sim.url, SimTokens(), verify=str(test_certs.bundle))
    assert client.whoami().user_id
    with pytest.raises(DataverseError) as err:  # the system roots alone do not trust the test CA
        DataverseClient(dataverse_https_sim.url, SimTokens()).whoami()
    assert "certificate" in str(err.value) and not isinstance(err.value, Transient)


def test_next_links_outside_the_instance_are_refused(dataverse_client: DataverseClient) -> None:
    with pytest.raises(DataverseError):
        dataverse_client.request("GET", "https://evil.example/api/data/v9.2/contacts")


def row_of(client: DataverseClient, external: str) -> ContactRef | None:
    """The row the sync uses for an external id, as sync/worker.py looks it up."""
    return pick_row(client.find_contacts([external]).get(external, ()))


# -- lookups ---------------------------------------------------------------------------------------------


def test_upsert_then_find_by_external_id(dataverse_sim: DataverseSimulator, dataverse_client: DataverseClient) -> None:
    mapped = map_contact(wave("c_1"), None)
    assert row_of(dataverse_client, "wavecnct_c_1") is None
    first = dataverse_client.upsert_contact(contact_id(ACCOUNT, "c_1"), mapped.payload)
    assert first.created and first.contactid == contact_id(ACCOUNT, "c_1") and first.etag
    second = dataverse_client.upsert_contact(first.contactid, mapped.payload)
    assert not second.created and second.etag != first.etag
    found = row_of(dataverse_client, "wavecnct_c_1")
    assert found is not None
    assert (found.contactid, found.statecode, found.externaluseridentifier) == (first.contactid, 0, "wavecnct_c_1")
    assert found.etag == second.etag and found.owner == dataverse_client.whoami().user_id


def test_find_contacts_many_at_once_chunked(dataverse_sim: DataverseSimulator, sim_tokens: SimTokens) -> None:
    client = DataverseClient(dataverse_sim.url, sim_tokens, url_budget=1200)
    ids = [f"c_{i}" for i in range(60)]
    for wave_id in ids[:40]:
        client.upsert_contact(contact_id(ACCOUNT, wave_id), map_contact(wave(wave_id), None).payload)
    # A row whose external id differs only in case is not a match: Wave ids are case-sensitive.
    client.upsert_contact(contact_id(ACCOUNT, "C_1"), map_contact(wave("C_1"), None).payload)
    before = len(dataverse_sim.request_log())
    found = client.find_contacts(external_id(w) for w in ids)
    lookups = len(dataverse_sim.request_log()) - before
    assert set(found) == {external_id(w) for w in ids[:40]}
    assert [r.contactid for r in found["wavecnct_c_1"]] == [contact_id(ACCOUNT, "c_1")]
    assert 1 < lookups < 60  # chunked by URL length, not one request per id
    assert all(len(e["path"]) < 1400 for e in dataverse_sim.request_log()[before:])


def test_lookups_escape_quotes(dataverse_sim: DataverseSimulator, dataverse_client: DataverseClient) -> None:
    odd = "wavecnct_o'brien&co+1"
    dataverse_client.upsert_contact(contact_id(ACCOUNT, "odd"), {"externaluseridentifier": odd, "lastname": "x"})
    assert row_of(dataverse_client, odd).externaluseridentifier == odd
    assert set(dataverse_client.find_contacts([odd, "wavecnct_other"])) == {odd}


def test_bulk_lookups_with_hostile_values(dataverse_sim: DataverseSimulator, sim_tokens: SimTokens) -> None:
    """Apostrophes, brackets, a trailing backslash, % # & +, astral Unicode: each found, in chunks that fit.

    The simulator lexes `[...]` as ODataLib does, so the plain JSON form of these arrays would get a 400."""
    emails = ["o'brien@contoso.com", "a]b@contoso.com", "x\\@contoso.com", "q'x@contoso.com", "50%#&+@contoso.com",
              "\U0001f600@contoso.com", '"quoted"@contoso.com']
    users = {e: dataverse_sim.add_user(e)["systemuserid"] for e in emails}
    client = DataverseClient(dataverse_sim.url, sim_tokens, url_budget=300)
    before = len(dataverse_sim.request_log())
    found = client.find_users_by_email([e.upper() for e in emails] + ["nobody'@contoso.com"])
    assert {e: [u.systemuserid for u in us] for e, us in found.items()} == {e.lower(): [users[e]] for e in emails}
    sent = dataverse_sim.request_log()[before:]
    assert len(sent) > 1 and all(entry["status"] == 200 for entry in sent)
    odd = [f"wavecnct_{v}" for v in ("o'b", "a]b", "[x", "x\\", "y'z")]
    for i, ext in enumerate(odd):
        client.upsert_contact(contact_id(ACCOUNT, f"odd{i}"), {"externaluseridentifier": ext, "lastname": "x"})
    assert set(client.find_contacts([*odd, "wavecnct_absent'"])) == set(odd)


def test_duplicate_rows_are_all_found_and_the_active_oldest_picked(dataverse_sim: DataverseSimulator,
                                                                   dataverse_client: DataverseClient) -> None:
    a = dataverse_client.upsert_contact(contact_id(ACCOUNT, "a"), {"externaluseridentifier": "wavecnct_dup"})
    b = dataverse_client.upsert_contact(contact_id(ACCOUNT, "b"), {"externaluseridentifier": "wavecnct_dup"})
    dataverse_client.deactivate_contact(a.contactid)
    rows = dataverse_client.find_contacts(["wavecnct_dup"])["wavecnct_dup"]
    assert {r.contactid for r in rows} == {a.contactid, b.contactid} and all(r.createdon for r in rows)
    assert row_of(dataverse_client, "wavecnct_dup").contactid == b.contactid


# -- writes ----------------------------------------------------------------------------------------------


def test_delete_deactivate_and_reactivate_by_upsert(dataverse_sim: DataverseSimulator,
                                                    dataverse_client: DataverseClient) -> None:
    gone = dataverse_client.upsert_contact(contact_id(ACCOUNT, "d"), map_contact(wave("d"), None).payload)
    assert dataverse_client.delete_contact(gone.contactid) is True
    assert dataverse_client.delete_contact(gone.contactid) is False
    assert dataverse_client.deactivate_contact(gone.contactid) is False

    kept = dataverse_client.upsert_contact(contact_id(ACCOUNT, "k"), map_contact(wave("k"), None).payload)
    assert dataverse_client.deactivate_contact(kept.contactid) is True
    row = dataverse_sim.rows()[0]
    assert (row["statecode"], row["statuscode"]) == (1, 2)
    ref = row_of(dataverse_client, "wavecnct_k")
    assert ref.statecode == 1
    newer = map_contact(wave("k", job_title="Returned"), None).payload
    with pytest.raises(ValidationFailed):  # inactive rows are read-only
        dataverse_client.upsert_contact(kept.contactid, newer)
    dataverse_client.upsert_contact(kept.contactid, newer, reactivate=True)
    row = dataverse_sim.rows()[0]
    assert (row["statecode"], row["statuscode"], row["jobtitle"]) == (0, 1, "Returned")


def test_delete_contacts_batches_independent_deletes_and_reports_each_refused_row(
        dataverse_sim: DataverseSimulator, sim_tokens: SimTokens) -> None:
    client = DataverseClient(dataverse_sim.url, sim_tokens, batch_size=10)
    rows = [client.upsert_contact(contact_id(ACCOUNT, f"del{i}"), {"lastname": f"d{i}"}).contactid for i in range(25)]
    refused_row, gone = rows[7], rows[12]
    assert client.delete_contact(gone) is True
    dataverse_sim.script_faults(Fault("status", status=403, code="0x80040220", method="DELETE",
                                      message="Principal user is missing prvDeleteContact privilege.",
                                      match=f"contacts({refused_row})", in_batch=True))
    since = len(dataverse_sim.request_log())
    refused = client.delete_contacts(rows)
    assert list(refused) == [refused_row] and isinstance(refused[refused_row], PermissionDenied)
    assert [r["contactid"] for r in dataverse_sim.rows()] == [refused_row]
    sent = dataverse_sim.request_log()[since:]
    assert [(e["method"], e["path"].rsplit("/", 1)[-1], e["inner"]) for e in sent] == [("POST", "$batch", 10)] * 2 + [
        ("POST", "$batch", 5)]  # 25 rows, 10 to a batch; the one already gone counts as deleted
    # sending them again deletes nothing twice; a lone row is one plain request
    assert client.delete_contacts(rows[:10]) == {}
    since = len(dataverse_sim.request_log())
    assert client.delete_contacts([refused_row]) == {} and dataverse_sim.rows() == []
    assert [e["method"] for e in dataverse_sim.request_log()[since:]] == ["DELETE"]
    kept = client.upsert_contact(contact_id(ACCOUNT, "deact"), {"lastname": "k"}).contactid
    assert client.delete_contacts([kept, rows[0]], deactivate=True) == {}  # the deleted row is not recreated
    assert [(r["contactid"], r["statecode"], r["statuscode"]) for r in dataverse_sim.rows()] == [(kept, 1, 2)]


def test_delete_contacts_raises_a_throttled_batch_and_keeps_what_was_deleted(sim_tokens: SimTokens) -> None:
    sim = DataverseSimulator(manual_clock=True).start()
    try:
        client = DataverseClient(sim.url, SimTokens(), batch_size=5, sleep=lambda s: None, clock=sim.clock.now)
        client.bulk_upsert([item(f"thr{i}") for i in range(25)], method="$batch")
        rows = [r["contactid"] for r in sim.rows()]
        sim.clock.advance(301)  # a fresh window of 4 requests
        sim.configure(requests=4, window_seconds=300)
        with pytest.raises(Throttled) as err:  # 5 batches > 4 requests in the window
            client.delete_contacts(rows)
        assert len(sim.rows()) == 5  # the batches admitted before the limit deleted their rows
        sim.clock.advance(err.value.retry_after + 1)
        # sent again (four batches of the window): the rows already deleted count as done
        assert client.delete_contacts(rows[:20]) == {}
        assert sorted(r["contactid"] for r in sim.rows()) == sorted(rows[20:])
    finally:
        sim.stop()


def test_delete_with_stale_etag_conflicts(dataverse_client: DataverseClient) -> None:
    created = dataverse_client.upsert_contact(contact_id(ACCOUNT, "e"), {"lastname": "x"})
    dataverse_client.upsert_contact(created.contactid, {"lastname": "y"})
    with pytest.raises(Conflict):
        dataverse_client.delete_contact(created.contactid, etag=created.etag)


def test_owner_binding_round_trip(dataverse_sim: DataverseSimulator, dataverse_client: DataverseClient) -> None:
    seller = dataverse_sim.add_user("seller@contoso.test")
    [user] = dataverse_client.find_users_by_email(["SELLER@contoso.test"])["seller@contoso.test"]
    owner = user.systemuserid
    assert owner == seller["systemuserid"]
    dataverse_client.upsert_contact(contact_id(ACCOUNT, "o"), map_contact(wave("o"), owner).payload)
    assert row_of(dataverse_client, "wavecnct_o").owner == owner


# -- users -----------------------------------------------------------------------------------------------


def test_user_lookup_enabled_only_and_escaped(dataverse_sim: DataverseSimulator,
                                              dataverse_client: DataverseClient) -> None:
    obrien = dataverse_sim.add_user("o'brien@contoso.test")
    dataverse_sim.add_user("off@contoso.test", enabled=False)
    app = dataverse_sim.add_user("shared@contoso.test", accessmode=4)
    human = dataverse_sim.add_user("Shared@Contoso.test", accessmode=0)
    found = dataverse_client.find_users_by_email(
        ["o'brien@contoso.test", "OFF@contoso.test", "shared@contoso.test", "nobody@x.test"])
    assert set(found) == {"o'brien@contoso.test", "shared@contoso.test"}
    assert [u.systemuserid for u in found["o'brien@contoso.test"]] == [obrien["systemuserid"]]
    # both users of the email, for sync/rules.py choose_owner to pick the interactive one
    assert {(u.systemuserid, u.accessmode) for u in found["shared@contoso.test"]} == {
        (human["systemuserid"], 0), (app["systemuserid"], 4)}


def test_user_lookup_batches_many_emails(dataverse_sim: DataverseSimulator, sim_tokens: SimTokens) -> None:
    client = DataverseClient(dataverse_sim.url, sim_tokens, url_budget=2000)
    emails = [f"user{i}@contoso.test" for i in range(120)]
    for email in emails[::2]:
        dataverse_sim.add_user(email)
    before = len(dataverse_sim.request_log())
    found = client.find_users_by_email(emails)
    assert set(found) == set(emails[::2])
    assert 1 < len(dataverse_sim.request_log()) - before < 20


# -- the race --------------------------------------------------------------------------------------------


def test_eight_racing_writers_create_one_row(dataverse_sim: DataverseSimulator, sim_tokens: SimTokens) -> None:
    """The same new Wave contact written by 8 threads at once: lookup, then upsert by the deterministic id."""
    start = threading.Barrier(8)
    results, errors = [], []
    mapped = map_contact(wave("race"), None)

    def writer() -> None:
        client = DataverseClient(dataverse_sim.url, sim_tokens)
        try:
            start.wait(5)
            ref = row_of(client, external_id("race"))
            target = ref.contactid if ref else contact_id(ACCOUNT, "race")
            results.append(client.upsert_contact(target, mapped.payload))
        except Exception as exc:  # collected: a failure in a thread must fail the test
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert errors == []
    assert len(dataverse_sim.contacts_by_external_id("wavecnct_race")) == 1
    assert [r.created for r in results].count(True) == 1
    assert {r.contactid for r in results} == {contact_id(ACCOUNT, "race")}
    # The caller's first requests arrived together too: still one systemuser for the token's oid.
    assert [u["azureactivedirectoryobjectid"] for u in dataverse_sim.rows("systemusers")] == [ADMIN_OID]


# -- bulk ------------------------------------------------------------------------------------------------


def _thousand_with_three_bad() -> tuple[list[UpsertItem], set[str]]:
    items = [item(f"c_{i}") for i in range(1000)]
    # Values the mapping would never produce (it cuts), sent raw to show isolation and reporting.
    bad = {"c_17": ("lastname", "x" * 51), "c_500": ("description", "d" * 2001), "c_998": ("jobtitle", "j" * 101)}
    for wave_id, (column, value) in bad.items():
        index = int(wave_id[2:])
        items[index] = UpsertItem(wave_id, items[index].contact_id, {**items[index].payload, column: value})
    return items, set(bad)


@pytest.mark.parametrize("bulk_messages", [True, False], ids=["UpsertMultiple", "$batch"])
def test_bulk_upsert_1000_with_3_invalid(dataverse_sim: DataverseSimulator, dataverse_client: DataverseClient,
                                         bulk_messages: bool) -> None:
    if not bulk_messages:
        dataverse_sim.set_bulk_messages([])
    items, bad = _thousand_with_three_bad()
    result = dataverse_client.bulk_upsert(items)
    assert result.method == ("UpsertMultiple" if bulk_messages else "$batch")
    assert len(result.succeeded) == 997 and set(result.succeeded).isdisjoint(bad)
    assert {(f.key, f.field, f.code) for f in result.failed} == {
        ("c_17", "lastname", "0x80044331"), ("c_500", "description", "0x80044331"),
        ("c_998", "jobtitle", "0x80044331")}
    assert all("exceeded the maximum allowed length" in f.message for f in result.failed)
    rows = dataverse_sim.rows()
    assert len(rows) == 997
    assert {r["externaluseridentifier"] for r in rows} == {external_id(f"c_{i}") for i in range(1000)} - {
        external_id(b) for b in bad}
    assert result.requests_made < 80
    # Running it again updates in place: still one row per contact.
    again = dataverse_client.bulk_upsert(items)
    assert len(again.succeeded) == 997 and len(dataverse_sim.rows()) == 997


def test_bulk_page_of_500_is_cheap(dataverse_sim: DataverseSimulator, dataverse_client: DataverseClient) -> None:
    """A backfill page: one lookup, one user lookup, one UpsertMultiple (+ capability checks, once per client)."""
    owner = dataverse_sim.add_user("owner@contoso.test")["systemuserid"]
    contacts = [wave(f"p_{i}", assigned_team_member={"email": "owner@contoso.test"}) for i in range(500)]
    dataverse_client.bulk_upsert([item("warm")])  # capability checks happen once per client
    before = len(dataverse_sim.request_log())
    existing = dataverse_client.find_contacts(external_id(c["id"]) for c in contacts)
    owners = dataverse_client.find_users_by_email({"owner@contoso.test"})
    items = [UpsertItem(c["id"], existing[external_id(c["id"])][0].contactid if external_id(c["id"]) in existing
                        else contact_id(ACCOUNT, c["id"]),
                        map_contact(c, owners["owner@contoso.test"][0].systemuserid).payload) for c in contacts]
    result = dataverse_client.bulk_upsert(items)
    requests_made = len(dataverse_sim.request_log()) - before
    assert len(result.succeeded) == 500 and requests_made / 500 < 0.05
    assert {r["_ownerid_value"] for r in dataverse_sim.rows() if r["externaluseridentifier"] != "wavecnct_warm"} == {
        owner}


def test_bulk_reports_missing_owner_as_ownerid(dataverse_sim: DataverseSimulator,
                                               dataverse_client: DataverseClient) -> None:
    ghost = "9f9f9f9f-0000-4000-8000-000000000000"
    items = [item("a"), item("b", owner=ghost), item("c")]
    result = dataverse_client.bulk_upsert(items)
    assert sorted(result.succeeded) == ["a", "c"]
    assert [(f.key, f.field, f.code, f.category) for f in result.failed] == [
        ("b", "ownerid", "0x80040217", "not_found")]


def test_bulk_raises_permission_denied_instead_of_bisecting(dataverse_sim: DataverseSimulator,
                                                            dataverse_client: DataverseClient) -> None:
    me = dataverse_client.whoami().user_id
    dataverse_sim.set_privileges(me, ["prvReadContact", "prvReadUser", "prvWriteContact"])
    before = len(dataverse_sim.request_log())
    with pytest.raises(PermissionDenied) as denied:
        dataverse_client.bulk_upsert([item(f"n_{i}") for i in range(50)])
    assert denied.value.privilege == "prvCreateContact"
    assert len(dataverse_sim.request_log()) - before <= 3


# -- error classes -----------------------------------------------------------------------------------------


def test_validation_failed_names_the_field(dataverse_client: DataverseClient) -> None:
    with pytest.raises(ValidationFailed) as err:
        dataverse_client.upsert_contact(contact_id(ACCOUNT, "v"), {"firstname": "f" * 51})
    assert (err.value.field, err.value.code, err.value.status) == ("firstname", "0x80044331", 400)
    with pytest.raises(ValidationFailed) as unknown:
        dataverse_client.upsert_contact(contact_id(ACCOUNT, "v"), {"nickname": "x"})
    assert unknown.value.field == "nickname"


def test_permission_denied_names_the_privilege(dataverse_sim: DataverseSimulator,
                                               dataverse_client: DataverseClient) -> None:
    me = dataverse_client.whoami().user_id
    dataverse_sim.set_privileges(me, ["prvReadContact"])
    with pytest.raises(PermissionDenied) as err:
        dataverse_client.upsert_contact(contact_id(ACCOUNT, "p"), {"lastname": "x"})
    assert err.value.privilege == "prvCreateContact" and err.value.category == "permission"


def test_short_retry_after_is_waited_inline(sim_tokens: SimTokens) -> None:
    sim = DataverseSimulator(manual_clock=True, limits=Limits(requests=2, window_seconds=2)).start()
    try:
        waits: list[float] = []

        def sleep(seconds: float) -> None:  # the simulator's clock moves instead of the test sleeping
            waits.append(seconds)
            sim.clock.advance(seconds)

        client = DataverseClient(sim.url, SimTokens(), sleep=sleep, clock=sim.clock.now, max_inline_wait=2.0)
        for _ in range(3):
            client.whoami()
        assert waits == [2.0]
        assert sim.counters()["throttled_0x80072322"] == 1
    finally:
        sim.stop()


def test_long_retry_after_raises_throttled(sim_tokens: SimTokens) -> None:
    sim = DataverseSimulator(manual_clock=True, limits=Limits(requests=2, window_seconds=300)).start()
    try:
        waits: list[float] = []
        client = DataverseClient(sim.url, SimTokens(), sleep=waits.append)
        client.whoami()
        client.whoami()
        with pytest.raises(Throttled) as err:
            client.whoami()
        assert err.value.retry_after == 300 and err.value.limit == "requests"
        assert err.value.code == "0x80072322" and err.value.category == "throttled"
        assert waits == []
    finally:
        sim.stop()


def test_no_thread_sends_during_a_penalty_it_has_seen(sim_tokens: SimTokens) -> None:
    """A request during a penalty would extend it: after one 429, the client's other calls wait or give up
    without sending, until Retry-After has passed."""
    sim = DataverseSimulator(manual_clock=True, limits=Limits(requests=2, window_seconds=60)).start()
    try:
        client = DataverseClient(sim.url, SimTokens(), sleep=lambda s: None, clock=sim.clock.now)
        client.whoami()
        client.whoami()
        with pytest.raises(Throttled):
            client.whoami()
        sent = len(sim.request_log())
        with pytest.raises(Throttled) as err:
            client.find_contacts(["wavecnct_x"])
        assert len(sim.request_log()) == sent and 0 < err.value.retry_after <= 60
        assert sim.counters()["throttled"] == 1  # the penalty was not extended
        sim.clock.advance(err.value.retry_after)
        assert client.find_contacts(["wavecnct_x"]) == {}
        assert len(sim.request_log()) == sent + 1
    finally:
        sim.stop()


def test_401_refreshes_the_token_once(dataverse_sim: DataverseSimulator, dataverse_client: DataverseClient,
                                      sim_tokens: SimTokens) -> None:
    dataverse_client.whoami()
    dataverse_sim.revoke_tokens()
    dataverse_client.whoami()
    assert sim_tokens.forced == 1
    dataverse_sim.script_faults(Fault("token_expired"))
    dataverse_client.whoami()
    assert sim_tokens.forced == 2


def test_auth_expired_after_the_refresh_fails(dataverse_sim: DataverseSimulator) -> None:
    forced: list[bool] = []

    def expired(force_refresh: bool = False) -> str:
        forced.append(force_refresh)
        return make_token(expires_in=-10)

    with pytest.raises(AuthExpired) as err:
        DataverseClient(dataverse_sim.url, expired).whoami()
    assert forced == [False, True] and err.value.category == "auth"
    assert "eyJ" not in str(err.value)


@pytest.mark.parametrize("fault", [Fault("status", status=503), Fault("status", status=502),
                                   Fault("status", status=504), Fault("drop")], ids=lambda f: f"{f.kind}{f.status}")
def test_transient_faults_retried_then_raised(dataverse_sim: DataverseSimulator, sim_tokens: SimTokens,
                                              fault: Fault) -> None:
    client = DataverseClient(dataverse_sim.url, sim_tokens, transient_retries=1, sleep=lambda s: None)
    dataverse_sim.script_faults(fault)
    assert client.whoami().user_id  # one fault: retried
    dataverse_sim.script_faults(fault, fault)
    with pytest.raises(Transient) as err:
        client.whoami()
    assert err.value.category == "transient"


def test_read_timeout_is_transient(dataverse_sim: DataverseSimulator, sim_tokens: SimTokens) -> None:
    client = DataverseClient(dataverse_sim.url, sim_tokens, timeout=(2.0, 0.3), transient_retries=0)
    dataverse_sim.script_faults(Fault("timeout", delay=3))
    with pytest.raises(Transient):
        client.whoami()


def test_error_classes_share_a_base() -> None:
    for cls in (Throttled, AuthExpired, PermissionDenied, ValidationFailed, NotFound, Conflict, Transient):
        assert issubclass(cls, DataverseError)


def test_bulk_raises_throttled_and_keeps_what_landed(sim_tokens: SimTokens) -> None:
    """A long Retry-After mid-backfill surfaces as Throttled (reschedule the page); landed chunks stay."""
    sim = DataverseSimulator(manual_clock=True, limits=Limits(requests=4, window_seconds=300)).start()
    try:
        client = DataverseClient(sim.url, SimTokens(), upsert_multiple_size=10, sleep=lambda s: None,
                                 clock=sim.clock.now)
        items = [item(f"t_{i}") for i in range(40)]  # 1 capability check + 4 chunks > 4 requests
        with pytest.raises(Throttled) as err:
            client.bulk_upsert(items)
        assert err.value.retry_after > client.max_inline_wait
        assert len(sim.rows()) == 30  # the chunks admitted before the limit landed
        sim.clock.advance(err.value.retry_after + 1)
        assert len(client.bulk_upsert(items).succeeded) == 40  # the retried page converges
        assert len(sim.rows()) == 40
    finally:
        sim.stop()
