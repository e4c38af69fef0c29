"""The Dataverse simulator driven by other people's clients, over HTTPS on the test CA: Microsoft's Python SDK
(PyPI PowerPlatform-Dataverse-Client) and the npm client dynamics-web-api (through tests/clients/
dynamics_web_api.mjs), for the operations a contact sync uses. Plus the simulator's own answers to the
metadata reads those clients make, `contacts/$count`, and `$filter` arrays lexed as ODataLib does."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from azure.core.credentials import AccessToken
from PowerPlatform.Dataverse.client import DataverseClient as SdkClient
from PowerPlatform.Dataverse.core.errors import HttpError
from PowerPlatform.Dataverse.models.upsert import UpsertItem

from dataverse.odata import in_filter
from devstack import certs as dev_certs
from devstack.dataverse_sim import DataverseSimulator
from tests.fixtures.dataverse import make_token

ROOT = Path(__file__).resolve().parent.parent
NODE_SCRIPT = ROOT / "tests" / "clients" / "dynamics_web_api.mjs"
METADATA_FILTER = "/EntityDefinitions?"
PICKLIST_CAST = "/Attributes/Microsoft.Dynamics.CRM.PicklistAttributeMetadata"


class SimCredential:
    """An azure-core TokenCredential handing out tokens the simulator accepts."""

    def __init__(self, audience: str) -> None:
        self.audience = audience
        self.scopes: list[tuple[str, ...]] = []

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.scopes.append(scopes)
        return AccessToken(make_token(aud=self.audience), int(time.time()) + 3600)


@pytest.fixture
def sim(test_certs: dev_certs.TestCerts) -> Iterator[DataverseSimulator]:
    simulator = DataverseSimulator(certfile=test_certs.server_cert, keyfile=test_certs.server_key).start()
    simulator.define_key()  # an Active alternate key on externaluseridentifier, as the sync's upserts use
    try:
        yield simulator
    finally:
        simulator.stop()
    assert simulator.internal_errors == [], "the simulator itself failed"


@pytest.fixture
def sdk(sim: DataverseSimulator, test_certs: dev_certs.TestCerts,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[SdkClient]:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(test_certs.bundle))  # requests' own way to trust the test CA
    with SdkClient(sim.url, SimCredential(sim.url)) as client:
        yield client


def paths(sim: DataverseSimulator, since: int = 0) -> list[tuple[str, str, int]]:
    return [(e["method"], e["path"], e["status"]) for e in sim.request_log()[since:]]


def by_external_id(sim: DataverseSimulator) -> dict[str, dict[str, Any]]:
    return {r["externaluseridentifier"]: r for r in sim.rows() if r.get("externaluseridentifier")}


# -- Microsoft's Python SDK ------------------------------------------------------------------------------------


def test_sdk_reads_table_metadata_before_its_first_write(sim: DataverseSimulator, sdk: SdkClient) -> None:
    contact_id = sdk.records.create("contact", {"firstname": "Ada", "lastname": "Lovelace",
                                                "externaluseridentifier": "wavecnct_ada"})
    sent = paths(sim)
    assert [m for m, _, _ in sent] == ["GET", "GET", "POST"]
    assert METADATA_FILTER in sent[0][1] and "LogicalName" in sent[0][1] and sent[0][2] == 200
    assert PICKLIST_CAST in sent[1][1] and "$expand=OptionSet" in sent[1][1] and sent[1][2] == 200
    assert sent[2][1].endswith("/contacts") and sent[2][2] == 204
    row = by_external_id(sim)["wavecnct_ada"]
    assert (row["contactid"], row["firstname"], row["lastname"]) == (contact_id, "Ada", "Lovelace")
    sdk.records.create("contact", {"lastname": "Second"})
    assert [m for m, _, _ in paths(sim, 3)] == ["POST"]  # the metadata is cached after the first write


def test_sdk_retrieve_update_delete_and_not_found(sim: DataverseSimulator, sdk: SdkClient) -> None:
    contact_id = sdk.records.create("contact", {"firstname": "Ada", "lastname": "Lovelace"})
    sdk.records.update("contact", contact_id, {"jobtitle": "Analyst", "firstname": None})
    record = sdk.records.retrieve("contact", contact_id, select=["firstname", "lastname", "jobtitle"])
    assert record is not None
    assert (record["firstname"], record["lastname"], record["jobtitle"]) == (None, "Lovelace", "Analyst")
    sdk.records.delete("contact", contact_id)
    assert sim.rows() == []
    assert sdk.records.retrieve("contact", contact_id) is None  # the SDK's reading of a 404
    with pytest.raises(HttpError) as err:
        sdk.records.update("contact", contact_id, {"jobtitle": "x"})  # If-Match: * on a deleted row
    assert err.value.status_code == 404
    assert err.value.details["service_error_code"] == "0x80040217"


def test_sdk_upserts_by_key_single_and_multiple(sim: DataverseSimulator, sdk: SdkClient) -> None:
    quote_key = {"externaluseridentifier": "wavecnct_o'brien"}  # the SDK doubles the quote in the key
    sdk.records.upsert("contact", [UpsertItem(alternate_key=quote_key, record={"lastname": "O'Brien"})])
    sdk.records.upsert("contact", [UpsertItem(alternate_key=quote_key, record={"firstname": "Pat"})])
    sdk.records.upsert("contact", [
        UpsertItem(alternate_key={"externaluseridentifier": f"wavecnct_{i}"}, record={"lastname": f"Bulk {i}"})
        for i in range(3)
    ])
    rows = by_external_id(sim)
    assert set(rows) == {"wavecnct_o'brien", "wavecnct_0", "wavecnct_1", "wavecnct_2"}
    assert (rows["wavecnct_o'brien"]["firstname"], rows["wavecnct_o'brien"]["lastname"]) == ("Pat", "O'Brien")
    sent = [p for _, p, _ in paths(sim)]
    assert any("contacts(externaluseridentifier='wavecnct_o''brien')" in p for p in sent)
    assert any(p.endswith("/contacts/Microsoft.Dynamics.CRM.UpsertMultiple") for p in sent)


def test_sdk_create_multiple_and_paging(sim: DataverseSimulator, sdk: SdkClient) -> None:
    ids = sdk.records.create("contact", [{"lastname": f"Page {i:02}"} for i in range(25)])
    assert len(ids) == 25 and sorted(ids) == sorted(r["contactid"] for r in sim.rows())
    before = len(sim.request_log())
    pages = [[r["lastname"] for r in page] for page in sdk.records.list_pages(
        "contact", select=["lastname"], filter="startswith(lastname,'Page')", orderby=["lastname desc"],
        page_size=10)]
    assert [len(p) for p in pages] == [10, 10, 5]
    assert [n for p in pages for n in p] == [f"Page {i:02}" for i in reversed(range(25))]
    assert len(sim.request_log()) - before == 3  # one request per page, following @odata.nextLink


def test_sdk_batch_with_change_sets(sim: DataverseSimulator, sdk: SdkClient) -> None:
    batch = sdk.batch.new()
    batch.records.create("contact", {"lastname": "Outside"})
    with batch.changeset() as changes:
        ref = changes.records.create("contact", {"lastname": "Inside"})
        changes.records.update("contact", ref, {"firstname": "Set through $1"})
    result = batch.execute()
    assert [r.status_code for r in result.responses] == [204, 204, 204] and not result.has_errors
    inside = next(r for r in sim.rows() if r["lastname"] == "Inside")
    assert inside["firstname"] == "Set through $1"

    failing = sdk.batch.new()
    with failing.changeset() as changes:
        changes.records.create("contact", {"lastname": "Rolled back"})
        changes.records.create("contact", {"lastname": "x" * 51})
    result = failing.execute()
    assert result.has_errors and [r.status_code for r in result.responses] == [400]
    assert "maximum allowed length of '50'" in result.responses[0].error_message
    assert not [r for r in sim.rows() if r["lastname"] == "Rolled back"]  # the change set is one transaction


def test_sdk_errors(sim: DataverseSimulator, sdk: SdkClient) -> None:
    with pytest.raises(HttpError) as err:
        sdk.records.create("contact", {"lastname": "x" * 51})
    assert err.value.status_code == 400 and err.value.details["service_error_code"] == "0x80044331"
    assert not err.value.is_transient
    with pytest.raises(HttpError) as err:
        list(sdk.records.list_pages("contact", filter=(
            """Microsoft.Dynamics.CRM.In(PropertyName='lastname',PropertyValues=["O'Brien"])""")))
    assert err.value.status_code == 400 and "unbalanced bracket" in str(err.value)


def test_sdk_sees_429_with_retry_after(sim: DataverseSimulator, sdk: SdkClient) -> None:
    sim.configure(requests=3, window_seconds=300)  # the two metadata reads and one create
    statuses = []
    for i in range(3):
        try:
            sdk.records.create("contact", {"lastname": f"T{i}"})
            statuses.append(204)
        except HttpError as throttled:
            statuses.append(throttled.status_code)
            assert throttled.is_transient and throttled.details["retry_after"] >= 1
            assert throttled.details["service_error_code"] == "0x80072322"
    assert statuses == [204, 429, 429] and len(sim.rows()) == 1


# -- dynamics-web-api (npm) --------------------------------------------------------------------------------


def run_node(sim: DataverseSimulator, certs: dev_certs.TestCerts, scenario: str) -> dict[str, Any]:
    env = {**os.environ, "DATAVERSE_URL": sim.url, "DATAVERSE_TOKEN": make_token(aud=sim.url),
           "NODE_EXTRA_CA_CERTS": str(certs.bundle)}
    done = subprocess.run(["node", str(NODE_SCRIPT), scenario], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_dynamics_web_api_contact_sync_operations(sim: DataverseSimulator, test_certs: dev_certs.TestCerts) -> None:
    out = run_node(sim, test_certs, "sync")
    created = out["create"]["ok"]
    assert created["lastname"] == "Lovelace" and created["@odata.etag"].startswith('W/"')
    assert out["retrieve"]["ok"]["firstname"] == "Ada"
    assert out["retrieveAfterUpdate"]["ok"]["jobtitle"] == "Analyst"
    upserted = out["upsertCreate"]["ok"]
    assert upserted["lastname"] == "O'Brien"
    assert out["upsertUpdate"]["ok"]["contactid"] == upserted["contactid"]  # the key found the same row
    assert [r["lastname"] for r in out["filterQuote"]["ok"]["value"]] == ["O'Brien"]
    assert len(out["createMultiple"]["ok"]["Ids"]) == 23
    assert out["upsertMultiple"] == {"ok": None}  # 204 No Content
    assert out["firstPage"]["ok"] == {"size": 10, "hasNext": True}
    assert out["retrieveAll"]["ok"] == 1 + 1 + 23 + 3  # every page followed
    assert out["countPath"]["ok"] == 28  # GET contacts/$count, text/plain
    assert out["countFiltered"]["ok"] == 23  # $count=true with the filter
    first, updated, second = out["batchChangeSet"]["ok"]
    assert updated is True and first and second
    rows = {r["contactid"]: r for r in sim.rows()}
    assert rows[first]["firstname"] == "Changed in the set"
    assert out["batchRollback"]["batchErrors"] == [{
        "status": 400, "code": "0x80044331",
        "message": ("A validation error occurred.  The length of the 'lastname' attribute of the 'contact' "
                    "entity exceeded the maximum allowed length of '50'.")}]
    assert not [r for r in rows.values() if r["lastname"] == "Rolled back"]
    found, missing = out["batchContinueOnError"]["ok"]
    assert found["lastname"] == "Lovelace" and missing["error"]["code"] == "0x80040217"
    assert out["delete"]["ok"] is True and created["contactid"] not in rows
    assert out["retrieveDeleted"]["error"]["status"] == 404
    assert out["tooLong"]["error"]["status"] == 400 and out["tooLong"]["error"]["code"] == "0x80044331"
    assert out["unknownColumn"]["error"]["status"] == 400
    assert "nosuchcolumn" in out["unknownColumn"]["error"]["message"]
    bad = out["badFilter"]["error"]
    assert bad["status"] == 400 and bad["message"] == "Found an unbalanced bracket expression."


def test_dynamics_web_api_sees_429_with_retry_after(sim: DataverseSimulator, test_certs: dev_certs.TestCerts) -> None:
    sim.configure(requests=2, window_seconds=300)
    out = run_node(sim, test_certs, "throttle")
    assert out["statuses"][:2] == [204, 204] and set(out["statuses"][2:]) == {429}
    throttled = out["create2"]["error"]
    assert throttled["code"] == "0x80072322" and int(throttled["retryAfter"]) >= 1
    assert len(sim.rows()) == 2


# -- the simulator's answers, read raw ---------------------------------------------------------------------


@pytest.fixture
def raw(sim: DataverseSimulator, test_certs: dev_certs.TestCerts) -> Iterator[requests.Session]:
    session = requests.Session()
    session.trust_env = False  # else a REQUESTS_CA_BUNDLE in the environment would replace `verify`
    session.verify = str(test_certs.bundle)
    session.headers.update({"Authorization": f"Bearer {make_token(aud=sim.url)}", "Accept": "application/json"})
    yield session
    session.close()


def test_entity_definitions_answer_what_the_clients_ask(sim: DataverseSimulator, raw: requests.Session) -> None:
    base = sim.api_url.rstrip("/")
    found = raw.get(f"{base}/EntityDefinitions", params={
        "$select": "LogicalName,EntitySetName,PrimaryIdAttribute", "$filter": "LogicalName eq 'contact'"})
    assert found.status_code == 200
    [contact] = found.json()["value"]
    assert {k: contact[k] for k in ("LogicalName", "EntitySetName", "PrimaryIdAttribute")} == {
        "LogicalName": "contact", "EntitySetName": "contacts", "PrimaryIdAttribute": "contactid"}
    assert set(contact) == {"MetadataId", "LogicalName", "EntitySetName", "PrimaryIdAttribute"}
    assert raw.get(f"{base}/EntityDefinitions", params={"$filter": "LogicalName eq 'nosuch'"}).json()["value"] == []
    by_id = raw.get(f"{base}/EntityDefinitions({contact['MetadataId']})", params={"$select": "LogicalName"})
    assert by_id.json()["LogicalName"] == "contact"

    picklists = raw.get(f"{base}/EntityDefinitions(LogicalName='systemuser'){PICKLIST_CAST}",
                        params={"$select": "LogicalName", "$expand": "OptionSet($select=Options)"})
    assert picklists.status_code == 200
    [access] = picklists.json()["value"]
    assert access["LogicalName"] == "accessmode"
    options = {o["Value"]: o["Label"]["UserLocalizedLabel"]["Label"] for o in access["OptionSet"]["Options"]}
    assert options[4] == "Non-interactive" and len(options) == 6
    contact_picklists = raw.get(f"{base}/EntityDefinitions(LogicalName='contact'){PICKLIST_CAST}")
    assert contact_picklists.json()["value"] == []  # the simulator's contact has no choice column

    bad = raw.get(f"{base}/EntityDefinitions", params={"$filter": "Nonsense eq 'contact'"})
    assert bad.status_code == 400 and "Nonsense" in bad.json()["error"]["message"]
    missing = raw.get(f"{base}/EntityDefinitions(LogicalName='nosuch')")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "0x80040217"


def test_count_path_is_plain_text_capped_at_5000(sim: DataverseSimulator, raw: requests.Session) -> None:
    base = sim.api_url.rstrip("/")
    assert raw.get(f"{base}/contacts/$count").text == "0"
    targets = [{"@odata.type": "Microsoft.Dynamics.CRM.contact", "lastname": f"n{i}"} for i in range(5001)]
    assert raw.post(f"{base}/contacts/Microsoft.Dynamics.CRM.CreateMultiple",
                    json={"Targets": targets}).status_code == 200
    counted = raw.get(f"{base}/contacts/$count")
    assert counted.status_code == 200 and counted.headers["Content-Type"].startswith("text/plain")
    assert counted.text == "5000"
    assert raw.get(f"{base}/contacts/$count", params={"$filter": "lastname eq 'n7'"}).text == "1"
    bad = raw.get(f"{base}/contacts/$count", params={"$filter": "lastname eq 'o'brien'"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "0x80060888"


def test_in_arrays_are_lexed_as_odatalib_does(sim: DataverseSimulator, raw: requests.Session) -> None:
    """The apostrophe goes raw into the JSON array: 400, nothing read. Escaped as the client does: found."""
    base = sim.api_url.rstrip("/")
    for name in ("O'Brien", "a]b", "x\\"):
        raw.post(f"{base}/contacts", json={"lastname": name})
    plain = """Microsoft.Dynamics.CRM.In(PropertyName='lastname',PropertyValues=["O'Brien"])"""
    refused = raw.get(f"{base}/contacts", params={"$filter": plain, "$select": "lastname"})
    assert refused.status_code == 400
    assert refused.json()["error"] == {"code": "0x80060888", "message": "Found an unbalanced bracket expression."}
    escaped = raw.get(f"{base}/contacts", params={"$filter": in_filter("lastname", ["o'brien", "A]B", "x\\"]),
                                                  "$select": "lastname"})
    assert escaped.status_code == 200
    assert sorted(r["lastname"] for r in escaped.json()["value"]) == ["O'Brien", "a]b", "x\\"]
    sim.configure(odata_lexer="7.7")  # ODataLib 7.7+ knows double-quoted strings: the apostrophe alone passes
    assert raw.get(f"{base}/contacts", params={"$filter": plain}).status_code == 200
