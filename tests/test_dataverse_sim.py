"""The Dataverse simulator on the wire: one test (or group) per documented Web API behaviour the product
relies on. A test named `test_webapi_NN_...` checks behaviour NN, documented at these pages under
https://learn.microsoft.com/power-apps/developer/data-platform/ :

01 authentication, base path:      authenticate-oauth
02 WhoAmI, x-ms-dop-hint:          webapi/reference/whoami, send-parallel-requests
03 create:                         webapi/create-entity-web-api
04 create with an existing id:     reference/web-service-error-codes (0x80040237)
05 upsert by id:                   webapi/update-delete-entities-using-web-api#upsert-a-table-row
06 conditional operations:         webapi/perform-conditional-operations-using-web-api
07 alternate keys:                 use-alternate-key-reference-record
08 delete:                         webapi/update-delete-entities-using-web-api
09 column lengths:                 reference/entities/contact
10, 14 errors:                     webapi/compose-http-requests-handle-errors
11 owner binding, users:           webapi/associate-disassociate-entities-using-web-api,
                                   reference/entities/systemuser
12 $filter:                        webapi/query/filter-rows
13 paging:                         webapi/query/page-results
15, 16 $batch:                     webapi/execute-batch-operations-using-web-api
17 CreateMultiple, UpsertMultiple: bulk-operations
18 service protection limits:      api-limits
19 entitlement:                    https://learn.microsoft.com/power-platform/admin/api-request-limits-allocations
20 duplicate detection:            webapi/manage-duplicate-detection-create-update
21 statecode / statuscode:         reference/entities/contact
22 impersonation:                  webapi/impersonate-another-user-web-api
23 faults on demand, 24 a deterministic clock: the simulator's own (devstack/dataverse/faults.py, clock.py)
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid

import pytest
import requests

from devstack.dataverse_sim import DataverseSimulator, Fault, Limits, SimConfig
from devstack.processes import free_port, stop_process, wait_for_port
from tests.fixtures.dataverse import make_token

JSON_TYPE = "application/json; odata.metadata=minimal"
MAXLEN_MESSAGE = ("A validation error occurred.  The length of the '{a}' attribute of the 'contact' entity exceeded "
                  "the maximum allowed length of '{n}'.")
KEY_NOT_VALID = (
    "The key in the request URI is not valid for resource 'Microsoft.Dynamics.CRM.contact'. Ensure that the names "
    "and number of key properties match the declared or alternate key properties for the resource "
    "'Microsoft.Dynamics.CRM.contact'."
)


class Api:
    """Raw HTTP against the simulator's Web API root, with a bearer token."""

    def __init__(self, sim: DataverseSimulator, token: str | None = None, verify: str | bool = True) -> None:
        self.sim = sim
        self.session = requests.Session()
        self.verify = verify
        self.session.headers.update({"Accept": "application/json", "OData-Version": "4.0"})
        if token is not None:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def __call__(self, method: str, path: str, **kw) -> requests.Response:
        # verify per request: REQUESTS_CA_BUNDLE in the environment would override session.verify
        return self.session.request(method, self.sim.api_url + path, timeout=10, verify=self.verify, **kw)


@pytest.fixture
def api(dataverse_sim: DataverseSimulator) -> Api:
    return Api(dataverse_sim, make_token())


def error_of(resp: requests.Response) -> tuple[str, str]:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    return body["error"]["code"], body["error"]["message"]


def new_id() -> str:
    return str(uuid.uuid4())


def contact(api: Api, **columns) -> str:
    contact_id = new_id()
    assert api("PATCH", f"contacts({contact_id})", json=columns).status_code == 204
    return contact_id


def batch_body(boundary: str, parts: list[str]) -> bytes:
    return ("".join(f"--{boundary}\r\n{p}\r\n" for p in parts) + f"--{boundary}--\r\n").encode()


def http_part(method: str, url: str, body: dict | None = None, content_id: str | None = None) -> str:
    head = "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
    if content_id:
        head += f"Content-ID: {content_id}\r\n"
    request = f"{method} {url} HTTP/1.1\r\n"
    if body is not None:
        request += "Content-Type: application/json\r\n\r\n" + json.dumps(body)
    else:
        request += "Accept: application/json\r\n\r\n"
    return head + "\r\n" + request


def changeset(boundary: str, parts: list[str]) -> str:
    return (f"Content-Type: multipart/mixed; boundary={boundary}\r\n\r\n"
            + batch_body(boundary, parts).decode().rstrip("\r\n"))


def response_statuses(resp: requests.Response) -> list[int]:
    return [int(line.split(" ")[1]) for line in resp.text.splitlines() if line.startswith("HTTP/1.1 ")]


# -- 1: base path and bearer authentication ------------------------------------------------------------


def test_webapi_01_requires_bearer_with_challenge(dataverse_sim: DataverseSimulator) -> None:
    """base path /api/data/v9.2/, Bearer required, 401 with a WWW-Authenticate challenge."""
    for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer not-a-jwt"},
                    {"Authorization": f"Bearer {make_token(expires_in=-60)}"}):
        resp = requests.get(dataverse_sim.api_url + "WhoAmI", headers=headers, timeout=5)
        assert resp.status_code == 401
        challenge = resp.headers["WWW-Authenticate"]
        assert challenge.startswith("Bearer authorization_uri=https://login.microsoftonline.com/")
        assert f"resource_id={dataverse_sim.url}/" in challenge
        assert error_of(resp)[0] == ""
    assert requests.get(dataverse_sim.url + "/api/data/v9.1/WhoAmI", timeout=5).status_code == 404


def test_webapi_01_token_oid_maps_to_systemuser_and_audience(dataverse_sim: DataverseSimulator) -> None:
    """the token's oid picks the systemuser; aud is checked when check_audience is on."""
    user = dataverse_sim.add_user("seller@contoso.test", oid="5e11e400-0000-4000-8000-000000000001")
    api = Api(dataverse_sim, make_token(oid=user["azureactivedirectoryobjectid"]))
    assert api("GET", "WhoAmI").json()["UserId"] == user["systemuserid"]

    unknown = Api(dataverse_sim, make_token(oid="5e11e400-0000-4000-8000-0000000000ff"))
    created = unknown("GET", "WhoAmI").json()["UserId"]
    assert any(u["systemuserid"] == created for u in dataverse_sim.rows("systemusers"))

    dataverse_sim.configure(auto_create_users=False)
    stranger = Api(dataverse_sim, make_token(oid="5e11e400-0000-4000-8000-0000000000fe"))
    resp = stranger("GET", "WhoAmI")
    assert resp.status_code == 403 and error_of(resp)[0] == "0x80072560"

    dataverse_sim.configure(auto_create_users=True, check_audience=True)
    assert Api(dataverse_sim, make_token(aud="https://other.crm.dynamics.com"))("GET", "WhoAmI").status_code == 401
    assert Api(dataverse_sim, make_token(aud=dataverse_sim.url + "/"))("GET", "WhoAmI").status_code == 200


# -- 2: WhoAmI ---------------------------------------------------------------------------------------


def test_webapi_02_whoami_and_dop_hint(dataverse_sim: DataverseSimulator, api: Api) -> None:
    """WhoAmI and WhoAmI() answer 200 with the documented body and an x-ms-dop-hint header."""
    dataverse_sim.configure(dop_hint=11)
    for path in ("WhoAmI", "WhoAmI()"):
        resp = api("GET", path)
        assert resp.status_code == 200
        body = resp.json()
        assert body["@odata.context"].endswith("$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse")
        assert {"UserId", "BusinessUnitId", "OrganizationId"} <= set(body)
        assert resp.headers["x-ms-dop-hint"] == "11"


# -- 3, 4: create ------------------------------------------------------------------------------------


def test_webapi_03_post_create(api: Api) -> None:
    """POST 204 + OData-EntityId; return=representation 201 with etag, $select, no OData-EntityId."""
    resp = api("POST", "contacts", json={"firstname": "Ada", "lastname": "Lovelace"})
    assert resp.status_code == 204
    assert resp.headers["OData-EntityId"].startswith(api.sim.api_url + "contacts(")

    resp = api("POST", "contacts?$select=firstname", json={"firstname": "Grace", "lastname": "Hopper"},
               headers={"Prefer": "return=representation"})
    assert resp.status_code == 201
    assert resp.headers["Preference-Applied"] == "return=representation"
    assert "OData-EntityId" not in resp.headers
    body = resp.json()
    assert body["@odata.etag"].startswith('W/"') and body["firstname"] == "Grace" and "contactid" in body
    assert "lastname" not in body


def test_webapi_04_post_existing_id_412(api: Api) -> None:
    """POST with an existing contactid -> 412 0x80040237."""
    contact_id = contact(api, lastname="One")
    resp = api("POST", "contacts", json={"contactid": contact_id, "lastname": "Two"})
    assert resp.status_code == 412
    assert error_of(resp) == ("0x80040237", "A record with matching key values already exists.")


# -- 5, 6: PATCH upsert and conditions -----------------------------------------------------------------


def test_webapi_05_patch_upsert_by_id(api: Api) -> None:
    """PATCH creates with the given GUID (204), updates (204); representation 201/200."""
    contact_id = new_id()
    assert api("PATCH", f"contacts({contact_id})", json={"lastname": "A"}).status_code == 204
    assert api("PATCH", f"contacts({contact_id})", json={"lastname": "B"}).status_code == 204
    rows = api.sim.rows()
    assert [(r["contactid"], r["lastname"]) for r in rows] == [(contact_id, "B")]

    other = new_id()
    prefer = {"Prefer": "return=representation"}
    assert api("PATCH", f"contacts({other})", json={"lastname": "C"}, headers=prefer).status_code == 201
    assert api("PATCH", f"contacts({other})", json={"lastname": "D"}, headers=prefer).status_code == 200


def test_webapi_06_conditional_headers(api: Api) -> None:
    """If-Match:* 404, If-None-Match:* 412, stale etag 412 RowVersion, etag bumps, GET 304."""
    missing = new_id()
    resp = api("PATCH", f"contacts({missing})", json={"lastname": "X"}, headers={"If-Match": "*"})
    assert resp.status_code == 404
    assert error_of(resp) == ("0x80040217", f"contact With Id = {missing} Does Not Exist")
    assert api.sim.rows() == []

    contact_id = contact(api, lastname="Y")
    resp = api("PATCH", f"contacts({contact_id})", json={"lastname": "Z"}, headers={"If-None-Match": "*"})
    assert resp.status_code == 412 and error_of(resp)[0] == "0x80040237"

    first = api("GET", f"contacts({contact_id})").json()["@odata.etag"]
    resp = api("PATCH", f"contacts({contact_id})", json={"lastname": "W"}, headers={"If-Match": first})
    assert resp.status_code == 204
    second = api("GET", f"contacts({contact_id})").json()["@odata.etag"]
    assert second != first
    resp = api("PATCH", f"contacts({contact_id})", json={"lastname": "V"}, headers={"If-Match": first})
    assert resp.status_code == 412
    assert error_of(resp)[1] == "The version of the existing record doesn't match the RowVersion property provided."
    assert api("GET", f"contacts({contact_id})", headers={"If-None-Match": second}).status_code == 304
    assert api("GET", f"contacts({contact_id})", headers={"If-None-Match": first}).status_code == 200


# -- 7: alternate keys ---------------------------------------------------------------------------------


def test_webapi_07_alternate_key_not_defined_400(api: Api) -> None:
    """no key on externaluseridentifier (the default) -> 400 0x80060888 with the exact text."""
    resp = api("PATCH", "contacts(externaluseridentifier='wavecnct_1')", json={"lastname": "A"})
    assert resp.status_code == 400
    assert error_of(resp) == ("0x80060888", KEY_NOT_VALID)
    api.sim.define_key(status="Pending")  # an index that is not Active yet does not work either
    assert api("PATCH", "contacts(externaluseridentifier='wavecnct_1')", json={"lastname": "A"}).status_code == 400


def test_webapi_07_alternate_key_upsert_and_quote_escapes(api: Api) -> None:
    """with an Active key, PATCH by key upserts (204, key-form OData-EntityId); '' escapes."""
    api.sim.define_key()
    resp = api("PATCH", "contacts(externaluseridentifier='wavecnct_O''Brien')", json={"lastname": "O'Brien"})
    assert resp.status_code == 204
    assert resp.headers["OData-EntityId"] == api.sim.api_url + "contacts(externaluseridentifier='wavecnct_O''Brien')"
    resp = api("PATCH", "contacts(externaluseridentifier='wavecnct_O''Brien')", json={"firstname": "Pat"},
               headers={"Prefer": "return=representation"})
    assert resp.status_code == 200
    rows = api.sim.rows()
    assert len(rows) == 1 and rows[0]["externaluseridentifier"] == "wavecnct_O'Brien"
    assert (rows[0]["firstname"], rows[0]["lastname"]) == ("Pat", "O'Brien")
    # The key is unique: another row cannot take the same value.
    other = api("PATCH", f"contacts({new_id()})", json={"externaluseridentifier": "WAVECNCT_o'brien"})
    assert other.status_code == 412 and error_of(other)[0] == "0x80060892"


# -- 8: delete -----------------------------------------------------------------------------------------


def test_webapi_08_delete(api: Api) -> None:
    """DELETE 204 then 404; If-Match with a stale etag -> 412."""
    contact_id = contact(api, lastname="A")
    etag = api("GET", f"contacts({contact_id})").json()["@odata.etag"]
    api("PATCH", f"contacts({contact_id})", json={"lastname": "B"})
    assert api("DELETE", f"contacts({contact_id})", headers={"If-Match": etag}).status_code == 412
    assert api("DELETE", f"contacts({contact_id})").status_code == 204
    resp = api("DELETE", f"contacts({contact_id})")
    assert resp.status_code == 404 and error_of(resp)[0] == "0x80040217"


# -- 9, 10: validation ----------------------------------------------------------------------------------

LIMITS = {"firstname": 50, "lastname": 50, "mobilephone": 50, "company": 50, "externaluseridentifier": 50,
          "emailaddress1": 100, "jobtitle": 100, "websiteurl": 200, "description": 2000}


@pytest.mark.parametrize(("column", "limit"), LIMITS.items())
def test_webapi_09_max_length(api: Api, column: str, limit: int) -> None:
    """MaxLength per column -> 400 0x80044331 with the exact double-space message."""
    assert api("PATCH", f"contacts({new_id()})", json={column: "x" * limit}).status_code == 204
    resp = api("PATCH", f"contacts({new_id()})", json={column: "x" * (limit + 1)})
    assert resp.status_code == 400
    assert error_of(resp) == ("0x80044331", MAXLEN_MESSAGE.format(a=column, n=limit))
    assert len(api.sim.rows()) == 1


def test_webapi_09_lengths_are_utf16_and_email_syntax_is_not_checked(api: Api) -> None:
    """no email syntax validation; length counts UTF-16 units like .NET."""
    assert api("PATCH", f"contacts({new_id()})", json={"emailaddress1": "not an email"}).status_code == 204
    assert api("PATCH", f"contacts({new_id()})", json={"firstname": "\U0001f600" * 26}).status_code == 400


def test_webapi_10_unknown_column_and_entity_set(api: Api) -> None:
    """unknown columns and entity sets -> 400/404 with 0x80060888."""
    resp = api("PATCH", f"contacts({new_id()})", json={"nickname": "x"})
    assert resp.status_code == 400 and error_of(resp)[0] == "0x80060888" and "'nickname'" in error_of(resp)[1]
    resp = api("GET", "widgets")
    assert resp.status_code == 404
    assert error_of(resp) == ("0x80060888", "Resource not found for the segment 'widgets'.")
    resp = api("GET", "contacts?$select=nickname")
    assert resp.status_code == 400 and error_of(resp)[0] == "0x80060888"


# -- 11: owners ---------------------------------------------------------------------------------------


def test_webapi_11_owner_binding(dataverse_sim: DataverseSimulator, api: Api) -> None:
    """ownerid@odata.bind to systemusers/teams, _ownerid_value, missing/disabled users."""
    seller = dataverse_sim.add_user("seller@contoso.test", accessmode=0)
    team = dataverse_sim.add_team("Sales")
    contact_id = contact(api, lastname="A", **{"ownerid@odata.bind": f"/systemusers({seller['systemuserid']})"})
    assert api("GET", f"contacts({contact_id})?$select=_ownerid_value").json()["_ownerid_value"] == seller[
        "systemuserid"]
    api("PATCH", f"contacts({contact_id})", json={"ownerid@odata.bind": f"/teams({team['teamid']})"})
    assert dataverse_sim.rows()[0]["_ownerid_value"] == team["teamid"]
    absolute = f"{dataverse_sim.api_url}systemusers({seller['systemuserid']})"
    assert api("PATCH", f"contacts({contact_id})", json={"ownerid@odata.bind": absolute}).status_code == 204
    assert dataverse_sim.rows()[0]["_ownerid_value"] == seller["systemuserid"]

    ghost = new_id()
    resp = api("PATCH", f"contacts({contact_id})", json={"ownerid@odata.bind": f"/systemusers({ghost})"})
    assert resp.status_code == 404
    assert error_of(resp) == ("0x80040217", f"systemuser With Id = {ghost} Does Not Exist")

    off = dataverse_sim.add_user("gone@contoso.test", enabled=False, accessmode=4)
    resp = api("PATCH", f"contacts({contact_id})", json={"ownerid@odata.bind": f"/systemusers({off['systemuserid']})"})
    assert resp.status_code == 400
    listed = api("GET", "systemusers?$select=isdisabled,accessmode&$filter=internalemailaddress eq "
                        "'GONE@contoso.test'").json()["value"]
    assert listed == [{"isdisabled": True, "accessmode": 4, "systemuserid": off["systemuserid"]}]


# -- 12, 13: queries -----------------------------------------------------------------------------------


def test_webapi_12_filter_subset(dataverse_sim: DataverseSimulator, api: Api) -> None:
    """eq/ne/and/or, case-insensitive, '' escapes, unterminated literal, functions, $select."""
    contact(api, firstname="Ada", lastname="O'Bryan", emailaddress1="ada@example.com")
    contact(api, firstname="Grace", lastname="Hopper", emailaddress1="grace@navy.mil")
    contact(api, firstname="Alan", lastname="Turing", emailaddress1="alan@example.com")

    def names(flt: str) -> list[str]:
        resp = api("GET", "contacts", params={"$select": "firstname", "$filter": flt})
        assert resp.status_code == 200, resp.text
        return sorted(r["firstname"] for r in resp.json()["value"])

    assert names("lastname eq 'o''bryan'") == ["Ada"]
    assert names("lastname ne 'Hopper' and endswith(emailaddress1,'@EXAMPLE.com')") == ["Ada", "Alan"]
    assert names("firstname eq 'Grace' or startswith(lastname,'tur')") == ["Alan", "Grace"]
    assert names("contains(emailaddress1,'navy') and not (firstname eq 'Ada')") == ["Grace"]
    assert names("Microsoft.Dynamics.CRM.In(PropertyName='firstname',PropertyValues=[\"ada\",\"ALAN\"])") == [
        "Ada", "Alan"]
    resp = api("GET", "contacts", params={"$filter": "lastname eq 'O'Bryan'"})
    assert resp.status_code == 400
    assert error_of(resp)[1] == "There is an unterminated literal at position 21 in 'lastname eq 'O'Bryan''."
    row = api("GET", "contacts", params={"$select": "firstname,lastname", "$filter": "firstname eq 'Ada'"}).json()
    assert set(row["value"][0]) == {"@odata.etag", "firstname", "lastname", "contactid"}

    dataverse_sim.add_user("Owner@Contoso.test")
    users = api("GET", "systemusers", params={"$select": "systemuserid,internalemailaddress",
                                               "$filter": "internalemailaddress eq 'owner@contoso.test'"})
    assert [u["internalemailaddress"] for u in users.json()["value"]] == ["Owner@Contoso.test"]


def test_webapi_13_paging(dataverse_sim: DataverseSimulator, api: Api) -> None:
    """odata.maxpagesize, Preference-Applied, nextLink with $skiptoken, $skip rejected, $top."""
    for i in range(12):
        contact(api, lastname=f"L{i:02d}")
    seen: list[str] = []
    resp = api("GET", "contacts?$select=lastname&$top=2", headers={"Prefer": "odata.maxpagesize=5"})
    assert resp.headers["Preference-Applied"] == "odata.maxpagesize=5"
    pages = 0
    while True:
        body = resp.json()
        pages += 1
        assert len(body["value"]) <= 5  # $top is ignored with maxpagesize
        seen += [r["lastname"] for r in body["value"]]
        if "@odata.nextLink" not in body:
            break
        assert "$skiptoken=" in body["@odata.nextLink"]
        resp = api.session.get(body["@odata.nextLink"], headers={"Prefer": "odata.maxpagesize=5"}, timeout=5)
        assert resp.status_code == 200, resp.text
    assert pages == 3 and sorted(seen) == [f"L{i:02d}" for i in range(12)]

    resp = api("GET", "contacts?$skip=5")
    assert resp.status_code == 400 and error_of(resp)[0] == "0x80060888"
    assert len(api("GET", "contacts?$top=4").json()["value"]) == 4
    big = api("GET", "contacts", headers={"Prefer": "odata.maxpagesize=9000"})
    assert big.headers["Preference-Applied"] == "odata.maxpagesize=5000"


# -- 14: error shape ----------------------------------------------------------------------------------


def test_webapi_14_error_shape_and_headers(dataverse_sim: DataverseSimulator, api: Api) -> None:
    """every error is {"error":{"code","message"}} with the OData JSON content type and version."""
    dataverse_sim.configure(requests=2, window_seconds=60)
    responses = [
        requests.get(dataverse_sim.api_url + "WhoAmI", timeout=5),  # 401
        api("GET", f"contacts({new_id()})"),  # 404
        api("GET", "contacts?$skip=1"),  # 400 (second request of the window: admitted)
        api("GET", "WhoAmI"),  # 429
    ]
    assert [r.status_code for r in responses] == [401, 404, 400, 429]
    for resp in responses:
        assert resp.headers["Content-Type"] == JSON_TYPE
        assert resp.headers["OData-Version"] == "4.0"
        code, message = error_of(resp)
        assert code == "" or (code.startswith("0x") and int(code, 16) > 0)
        assert message


# -- 15, 16: $batch --------------------------------------------------------------------------------------


def test_webapi_15_batch_parts_changesets_and_references(api: Api) -> None:
    """multipart parts and change sets, Content-ID $n references, relative/absolute URLs, order."""
    first, second = new_id(), new_id()
    body = batch_body("batch_AAA", [
        http_part("PATCH", f"/api/data/v9.2/contacts({first})", {"lastname": "First"}),
        changeset("changeset_BBB", [
            http_part("POST", f"{api.sim.api_url}contacts", {"lastname": "Created"}, content_id="1"),
            http_part("PATCH", "$1", {"firstname": "Referenced"}, content_id="2"),
        ]),
        http_part("PATCH", f"contacts({second})", {"lastname": "Relative"}),
        http_part("GET", f"/api/data/v9.2/contacts({first})?$select=lastname"),
    ])
    resp = api("POST", "$batch", data=body, headers={"Content-Type": "multipart/mixed; boundary=batch_AAA"})
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("multipart/mixed; boundary=batchresponse_")
    assert "changesetresponse_" in resp.text
    assert response_statuses(resp) == [204, 204, 204, 204, 200]
    assert '"lastname": "First"' in resp.text
    names = sorted((r["firstname"] or "", r["lastname"]) for r in api.sim.rows())
    assert names == [("", "First"), ("", "Relative"), ("Referenced", "Created")]

    too_many = batch_body("b", [http_part("GET", "WhoAmI")] * 1001)
    resp = api("POST", "$batch", data=too_many, headers={"Content-Type": "multipart/mixed; boundary=b"})
    assert resp.status_code == 400
    undeclared = batch_body("b", [changeset("c", [http_part("PATCH", "$9", {"lastname": "x"}, content_id="1")])])
    resp = api("POST", "$batch", data=undeclared, headers={"Content-Type": "multipart/mixed; boundary=b"})
    assert resp.status_code == 400 and "Content-ID Reference: '$9' does not exist in the batch context." in resp.text


def test_webapi_16_batch_stops_at_first_failure_without_continue(api: Api) -> None:
    """no continue-on-error: stop at the first failure; outer status is the failure's; only it."""
    ok1, bad, ok2 = new_id(), new_id(), new_id()
    body = batch_body("b", [
        http_part("PATCH", f"contacts({ok1})", {"lastname": "ok"}),
        http_part("PATCH", f"contacts({bad})", {"lastname": "x" * 51}),
        http_part("PATCH", f"contacts({ok2})", {"lastname": "never"}),
    ])
    resp = api("POST", "$batch", data=body, headers={"Content-Type": "multipart/mixed; boundary=b"})
    assert resp.status_code == 400
    assert response_statuses(resp) == [400] and "0x80044331" in resp.text
    assert [r["contactid"] for r in api.sim.rows()] == [ok1]


def test_webapi_16_continue_on_error_and_changeset_rollback(api: Api) -> None:
    """with continue-on-error outer 200 and a status per part; a failing change set rolls back."""
    ok1, bad, cs1, cs2, ok2 = (new_id() for _ in range(5))
    body = batch_body("b", [
        http_part("PATCH", f"contacts({ok1})", {"lastname": "ok"}),
        http_part("PATCH", f"contacts({bad})", {"lastname": "x" * 51}),
        changeset("c", [
            http_part("PATCH", f"contacts({cs1})", {"lastname": "rolled back"}, content_id="1"),
            http_part("PATCH", f"contacts({cs2})", {"nosuchcolumn": 1}, content_id="2"),
        ]),
        http_part("PATCH", f"contacts({ok2})", {"lastname": "ok too"}),
    ])
    resp = api("POST", "$batch", data=body, headers={"Content-Type": "multipart/mixed; boundary=b",
                                                     "Prefer": "odata.continue-on-error"})
    assert resp.status_code == 200
    assert response_statuses(resp) == [204, 400, 400, 204]
    assert sorted(r["contactid"] for r in api.sim.rows()) == sorted([ok1, ok2])


def test_webapi_16_a_batch_of_deletes_answers_each_row_alone(dataverse_sim: DataverseSimulator, api: Api) -> None:
    """independent DELETEs in one $batch: each part its own status (204, 404 for a row already gone, an
    error for a row refused), the others deleted; one request on the wire, each delete counted."""
    rows = [contact(api, lastname=f"r{i}") for i in range(4)]
    gone = new_id()
    dataverse_sim.script_faults(Fault("status", status=400, code="0x80040265", message="A plug-in refused.",
                                      method="DELETE", match=f"contacts({rows[2]})", in_batch=True))
    parts = [http_part("DELETE", f"contacts({row})") for row in (rows[0], gone, rows[1], rows[2], rows[3])]
    before = dataverse_sim.counters()
    resp = api("POST", "$batch", data=batch_body("b", parts), headers={
        "Content-Type": "multipart/mixed; boundary=b", "Prefer": "odata.continue-on-error"})
    assert resp.status_code == 200
    assert response_statuses(resp) == [204, 404, 204, 400, 204]
    assert "0x80040217" in resp.text and "0x80040265" in resp.text  # ObjectDoesNotExist; the refusal
    assert [r["contactid"] for r in dataverse_sim.rows()] == [rows[2]]
    after = dataverse_sim.counters()
    assert after["requests"] - before["requests"] == 1 and after["batch_inner_requests"] - before.get(
        "batch_inner_requests", 0) == 5
    assert sum(after["entitlement"].values()) - sum(before["entitlement"].values()) == 3  # the three deletes
    [entry] = [e for e in dataverse_sim.request_log() if e["path"].endswith("$batch")]
    # charged every part's execution time: a base per part and per row deleted, beyond the outer request's
    config = dataverse_sim.config
    assert entry["exec_ms"] >= config.base_ms * 6 + config.per_record_ms * 3 and entry["writes"] == 3
    # a fault meant for a part never answers a request on the wire
    dataverse_sim.script_faults(Fault("status", status=400, method="DELETE", in_batch=True))
    assert api("DELETE", f"contacts({rows[2]})").status_code == 204
    assert dataverse_sim.faults.pending() != []


# -- 17: bulk messages -----------------------------------------------------------------------------------


def test_webapi_17_create_update_upsert_multiple(api: Api) -> None:
    """CreateMultiple 200 Ids; UpdateMultiple/UpsertMultiple 204; @odata.type required."""
    t = "Microsoft.Dynamics.CRM.contact"
    resp = api("POST", "contacts/Microsoft.Dynamics.CRM.CreateMultiple",
               json={"Targets": [{"@odata.type": t, "lastname": "A"}, {"@odata.type": t, "lastname": "B"}]})
    assert resp.status_code == 200
    ids = resp.json()["Ids"]
    assert resp.json()["@odata.context"].endswith("Microsoft.Dynamics.CRM.CreateMultipleResponse")
    assert len(ids) == 2

    resp = api("POST", "contacts/Microsoft.Dynamics.CRM.UpdateMultiple", json={"Targets": [
        {"@odata.type": t, "contactid": ids[0], "lastname": "first wins"},
        {"@odata.type": t, "contactid": ids[0], "lastname": "ignored"}]})
    assert resp.status_code == 204
    assert {r["lastname"] for r in api.sim.rows()} == {"first wins", "B"}

    fresh = new_id()
    resp = api("POST", "contacts/Microsoft.Dynamics.CRM.UpsertMultiple", json={"Targets": [
        {"@odata.type": t, "contactid": ids[1], "lastname": "upserted"},
        {"@odata.type": t, "contactid": fresh, "lastname": "new"}]})
    assert resp.status_code == 204
    assert {r["lastname"] for r in api.sim.rows()} == {"first wins", "upserted", "new"}

    resp = api("POST", "contacts/Microsoft.Dynamics.CRM.UpsertMultiple",
               json={"Targets": [{"contactid": new_id(), "lastname": "untyped"}]})
    assert resp.status_code == 400 and "without a type name" in error_of(resp)[1]


def test_webapi_17_bulk_is_all_or_nothing(api: Api) -> None:
    """one bad record rolls back the whole request; duplicate keys in UpsertMultiple fail."""
    t = "Microsoft.Dynamics.CRM.contact"
    targets = [{"@odata.type": t, "contactid": new_id(), "lastname": f"L{i}"} for i in range(5)]
    targets[3]["jobtitle"] = "j" * 101
    resp = api("POST", "contacts/Microsoft.Dynamics.CRM.UpsertMultiple", json={"Targets": targets})
    assert resp.status_code == 400 and error_of(resp)[0] == "0x80044331"
    resp = api("POST", "contacts/Microsoft.Dynamics.CRM.CreateMultiple", json={"Targets": targets})
    assert resp.status_code == 400
    assert api.sim.rows() == []

    same = new_id()
    resp = api("POST", "contacts/Microsoft.Dynamics.CRM.UpsertMultiple", json={"Targets": [
        {"@odata.type": t, "contactid": same, "lastname": "a"},
        {"@odata.type": t, "contactid": same, "lastname": "b"}]})
    assert resp.status_code == 400 and api.sim.rows() == []


def test_webapi_17_upsert_multiple_by_key_and_key_in_body(api: Api) -> None:
    """@odata.id with an alternate key; the key also in the body on create -> 400 0x80040216."""
    api.sim.define_key()
    t = "Microsoft.Dynamics.CRM.contact"
    resp = api("POST", "contacts/Microsoft.Dynamics.CRM.UpsertMultiple", json={"Targets": [
        {"@odata.type": t, "@odata.id": "contacts(externaluseridentifier='wavecnct_a')", "lastname": "A"}]})
    assert resp.status_code == 204
    resp = api("POST", "contacts/Microsoft.Dynamics.CRM.UpsertMultiple", json={"Targets": [
        {"@odata.type": t, "@odata.id": "contacts(externaluseridentifier='wavecnct_b')",
         "externaluseridentifier": "wavecnct_b", "lastname": "B"}]})
    assert resp.status_code == 400
    assert error_of(resp) == ("0x80040216", "An unexpected error occurred.")
    # On the update path the key in the body is tolerated.
    resp = api("POST", "contacts/Microsoft.Dynamics.CRM.UpsertMultiple", json={"Targets": [
        {"@odata.type": t, "@odata.id": "contacts(externaluseridentifier='wavecnct_a')",
         "externaluseridentifier": "wavecnct_a", "lastname": "A2"}]})
    assert resp.status_code == 204
    assert [(r["externaluseridentifier"], r["lastname"]) for r in api.sim.rows()] == [("wavecnct_a", "A2")]


def test_webapi_17_availability_through_sdkmessagefilters(dataverse_sim: DataverseSimulator, api: Api) -> None:
    """bulk availability is configurable and answered through GET sdkmessagefilters."""
    query = {"$select": "sdkmessagefilterid",
             "$filter": "sdkmessageid/name eq 'UpsertMultiple' and primaryobjecttypecode eq 'contact'"}
    assert len(api("GET", "sdkmessagefilters", params=query).json()["value"]) == 1
    dataverse_sim.set_bulk_messages([])
    assert api("GET", "sdkmessagefilters", params=query).json()["value"] == []
    resp = api("POST", "contacts/Microsoft.Dynamics.CRM.UpsertMultiple", json={"Targets": [
        {"@odata.type": "Microsoft.Dynamics.CRM.contact", "contactid": new_id()}]})
    assert resp.status_code == 404


# -- 18, 19: service protection and entitlement ------------------------------------------------------------


@pytest.fixture
def limited() -> DataverseSimulator:
    sim = DataverseSimulator(manual_clock=True, limits=Limits(requests=5, execution_ms=1000, concurrency=2,
                                                              window_seconds=10, penalty_extension_seconds=2))
    sim.start()
    yield sim
    sim.stop()


def test_webapi_18_request_limit_sliding_window(limited: DataverseSimulator) -> None:
    """requests over the window -> 429 0x80072322 + Retry-After; penalty extends; window slides."""
    api = Api(limited, make_token())
    for _ in range(5):
        assert api("GET", "WhoAmI").status_code == 200
        limited.clock.advance(1)
    resp = api("GET", "WhoAmI")
    assert resp.status_code == 429
    assert error_of(resp) == ("0x80072322", "Number of requests exceeded the limit of 5 over time window of 10 "
                                            "seconds.")
    assert resp.headers["Retry-After"] == "5"  # the oldest request leaves the window 5 s from now
    again = api("GET", "WhoAmI")  # still sending during the penalty: refused, and the wait grows
    assert again.status_code == 429 and int(again.headers["Retry-After"]) > 5
    limited.clock.advance(int(again.headers["Retry-After"]))
    ok = api("GET", "WhoAmI")
    assert ok.status_code == 200
    assert int(ok.headers["x-ms-ratelimit-burst-remaining-xrm-requests"]) >= 0
    counters = limited.counters()
    assert counters["throttled_0x80072322"] == 2
    assert counters["sent_during_penalty"] == 1  # the second 429: sent while the first one's penalty ran


def test_webapi_18_execution_time_limit_and_batch_charging(limited: DataverseSimulator) -> None:
    """a $batch/bulk request counts once but is charged its whole execution time -> 0x80072321."""
    limited.configure(base_ms=10, per_record_ms=100)
    api = Api(limited, make_token())
    targets = [{"@odata.type": "Microsoft.Dynamics.CRM.contact", "contactid": new_id()} for _ in range(12)]
    assert api("POST", "contacts/Microsoft.Dynamics.CRM.UpsertMultiple",
               json={"Targets": targets}).status_code == 204
    resp = api("GET", "WhoAmI")
    assert resp.status_code == 429
    code, message = error_of(resp)
    assert code == "0x80072321"
    assert message == ("Combined execution time of incoming requests exceeded limit of 1,000  milliseconds over time "
                       "window of 10 seconds. Decrease number of concurrent requests or reduce the duration of "
                       "requests and try again later.")
    assert int(resp.headers["Retry-After"]) == 10
    limited.clock.advance(11 + 2)
    assert api("GET", "WhoAmI").status_code == 200
    assert limited.counters()["entitlement"] and sum(limited.counters()["entitlement"].values()) == 12 + 1


def test_webapi_18_concurrency_refused_immediately(limited: DataverseSimulator) -> None:
    """more requests in flight than allowed -> immediate 429 0x80072326."""
    api = Api(limited, make_token())
    limited.script_faults(Fault("hold", delay=10), Fault("hold", delay=10))
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(Api(limited, make_token())("GET", "WhoAmI")
                                                              .status_code)) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while limited.in_flight() < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert limited.in_flight() == 2
    resp = api("GET", "WhoAmI")
    assert resp.status_code == 429
    assert error_of(resp) == ("0x80072326", "Number of concurrent requests exceeded the limit of 2.")
    limited.release_held()
    for t in threads:
        t.join(5)
    assert results == [200, 200]
    assert api("GET", "WhoAmI").status_code == 200  # no penalty after a concurrency refusal


def test_webapi_19_entitlement_counts_each_operation(dataverse_sim: DataverseSimulator, api: Api) -> None:
    """every CRUD counts for entitlement, each one inside a $batch or bulk request too; never blocks."""
    body = batch_body("b", [http_part("PATCH", f"contacts({new_id()})", {"lastname": str(i)}) for i in range(3)])
    api("POST", "$batch", data=body, headers={"Content-Type": "multipart/mixed; boundary=b"})
    api("POST", "contacts/Microsoft.Dynamics.CRM.UpsertMultiple", json={"Targets": [
        {"@odata.type": "Microsoft.Dynamics.CRM.contact", "contactid": new_id()} for _ in range(4)]})
    counters = dataverse_sim.counters()
    assert sum(counters["entitlement"].values()) == 7
    assert counters["requests"] == 2


# -- 20, 21, 22 -----------------------------------------------------------------------------------------


def test_webapi_20_duplicate_detection_only_when_asked(dataverse_sim: DataverseSimulator, api: Api) -> None:
    """duplicate detection is off unless MSCRM.SuppressDuplicateDetection: false; then 500 0x80040333."""
    dataverse_sim.configure(duplicate_rule_columns=["emailaddress1"])
    contact(api, emailaddress1="same@example.com")
    assert api("PATCH", f"contacts({new_id()})", json={"emailaddress1": "SAME@example.com"}).status_code == 204
    resp = api("PATCH", f"contacts({new_id()})", json={"emailaddress1": "same@example.com"},
               headers={"MSCRM.SuppressDuplicateDetection": "false"})
    assert resp.status_code == 500
    assert error_of(resp) == ("0x80040333", "A record was not created or updated because a duplicate of the current "
                                            "record already exists.")


def test_webapi_21_state_and_status(dataverse_sim: DataverseSimulator, api: Api) -> None:
    """state/status pairs, default status, inactive rows read-only until reactivated."""
    contact_id = contact(api, lastname="A")
    resp = api("PATCH", f"contacts({contact_id})", json={"statecode": 1, "statuscode": 1})
    assert resp.status_code == 400 and "is not a valid status code" in error_of(resp)[1]
    assert api("PATCH", f"contacts({contact_id})", json={"statecode": 1}).status_code == 204
    row = dataverse_sim.rows()[0]
    assert (row["statecode"], row["statuscode"]) == (1, 2)
    resp = api("PATCH", f"contacts({contact_id})", json={"lastname": "B"})
    assert resp.status_code == 400
    assert api("PATCH", f"contacts({contact_id})", json={"lastname": "B", "statecode": 0,
                                                         "statuscode": 1}).status_code == 204
    row = dataverse_sim.rows()[0]
    assert (row["statecode"], row["statuscode"], row["lastname"]) == (0, 1, "B")


def test_webapi_22_impersonation(dataverse_sim: DataverseSimulator, api: Api) -> None:
    """CallerObjectId / MSCRMCallerID act as another user, recorded in createdonbehalfby."""
    seller = dataverse_sim.add_user("seller@contoso.test", oid="5e11e400-0000-4000-8000-000000000002")
    me = api("GET", "WhoAmI").json()["UserId"]
    contact_id = new_id()
    resp = api("PATCH", f"contacts({contact_id})", json={"lastname": "A"},
               headers={"CallerObjectId": seller["azureactivedirectoryobjectid"]})
    assert resp.status_code == 204
    row = dataverse_sim.rows()[0]
    assert (row["_createdby_value"], row["_createdonbehalfby_value"], row["_ownerid_value"]) == (
        seller["systemuserid"], me, seller["systemuserid"])
    resp = api("GET", "WhoAmI", headers={"MSCRMCallerID": seller["systemuserid"]})
    assert resp.json()["UserId"] == seller["systemuserid"]

    dataverse_sim.set_privileges(me, ["prvReadContact", "prvWriteContact", "prvCreateContact"])
    resp = api("GET", "WhoAmI", headers={"CallerObjectId": seller["azureactivedirectoryobjectid"]})
    assert resp.status_code == 403
    assert error_of(resp)[0] == "0x80040220" and "prvActOnBehalfOfAnotherUser" in error_of(resp)[1]


# -- 23: faults ---------------------------------------------------------------------------------------------


def test_webapi_23_scripted_faults(dataverse_sim: DataverseSimulator, api: Api) -> None:
    """scripted 5xx, token expiry, slow responses, timeouts and dropped connections."""
    dataverse_sim.script_faults(Fault("status", status=503), Fault("status", status=502),
                                Fault("token_expired"), Fault("slow", delay=0.05), Fault("drop"))
    first = api("GET", "WhoAmI")
    assert first.status_code == 503 and first.headers["Content-Type"] == JSON_TYPE
    assert api("GET", "WhoAmI").status_code == 502
    expired = api("GET", "WhoAmI")
    assert expired.status_code == 401 and 'error="invalid_token"' in expired.headers["WWW-Authenticate"]
    assert api("GET", "WhoAmI").status_code == 200  # slow, then served
    with pytest.raises(requests.ConnectionError):
        api("GET", "WhoAmI")
    dataverse_sim.script_faults(Fault("timeout", delay=2))
    with pytest.raises(requests.Timeout):
        api.session.get(dataverse_sim.api_url + "WhoAmI", timeout=0.3)
    assert api("GET", "WhoAmI").status_code == 200
    assert dataverse_sim.counters()["faults_injected"] == 6

    dataverse_sim.script_faults(Fault("status", status=429, retry_after=7), Fault("status", status=403),
                                Fault("status", status=400, code="0x80044331", message="custom"))
    throttled = api("GET", "WhoAmI")
    assert throttled.status_code == 429 and throttled.headers["Retry-After"] == "7"
    assert error_of(throttled)[0] == "0x80072322"
    assert error_of(api("GET", "WhoAmI")) == ("0x80040220", "The user does not hold the necessary privileges.")
    assert error_of(api("GET", "WhoAmI")) == ("0x80044331", "custom")


def test_webapi_23_fault_rates_are_seeded(dataverse_sim: DataverseSimulator) -> None:
    """random faults at a configured rate, reproducible with a seed, matched by path."""

    def run() -> list[int]:
        sim = DataverseSimulator(fault_seed=7).start()
        try:
            sim.set_fault_rates([(Fault("status", status=504, match="contacts"), 0.5)])
            api = Api(sim, make_token())
            statuses = [api("GET", "contacts").status_code for _ in range(20)]
            assert api("GET", "WhoAmI").status_code == 200  # does not match the path
            return statuses
        finally:
            sim.stop()

    first = run()
    assert first == run()
    assert 504 in first and 200 in first


def test_webapi_23_token_revocation(dataverse_sim: DataverseSimulator) -> None:
    """token expiry: a token seen before revoke_tokens() gets 401; a new one works."""
    old = Api(dataverse_sim, make_token())
    assert old("GET", "WhoAmI").status_code == 200
    dataverse_sim.revoke_tokens()
    assert old("GET", "WhoAmI").status_code == 401
    assert Api(dataverse_sim, make_token())("GET", "WhoAmI").status_code == 200


# -- 24: determinism -------------------------------------------------------------------------------------


def test_webapi_24_deterministic_ids_and_clock() -> None:
    """with an id seed and a manual clock, two runs produce the same ids and timestamps."""

    def run() -> list[tuple[str, str]]:
        sim = DataverseSimulator(id_seed="bench", manual_clock=True).start()
        try:
            api = Api(sim, make_token())
            for i in range(3):
                api("POST", "contacts", json={"lastname": str(i)})
                sim.clock.advance(60)
            return sorted((r["contactid"], r["createdon"]) for r in sim.rows())
        finally:
            sim.stop()

    first = run()
    assert first == run()
    assert len({created for _, created in first}) == 3


# -- beyond those: transport, metadata, control API, process ----------------------------------------


def test_https_with_the_test_ca(dataverse_https_sim: DataverseSimulator, test_certs) -> None:
    """HTTPS with the test CA: trusted through the bundle, refused without it."""
    assert dataverse_https_sim.url.startswith("https://")
    api = Api(dataverse_https_sim, make_token(), verify=str(test_certs.bundle))
    assert api("GET", "WhoAmI").status_code == 200
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(dataverse_https_sim.api_url + "WhoAmI", timeout=5)


def test_keys_metadata_and_user_privileges(dataverse_sim: DataverseSimulator, api: Api) -> None:
    """EntityDefinitions(LogicalName='contact')/Keys and systemusers(<id>)/RetrieveUserPrivileges."""
    assert api("GET", "EntityDefinitions(LogicalName='contact')/Keys").json()["value"] == []
    dataverse_sim.define_key(status="InProgress")
    keys = api("GET", "EntityDefinitions(LogicalName='contact')/Keys?$select=KeyAttributes,EntityKeyIndexStatus")
    assert [(k["KeyAttributes"], k["EntityKeyIndexStatus"]) for k in keys.json()["value"]] == [
        (["externaluseridentifier"], "InProgress")]

    user = dataverse_sim.add_user("rep@contoso.test", privileges={"prvReadContact", "prvCreateContact"})
    resp = api("GET", f"systemusers({user['systemuserid']})/Microsoft.Dynamics.CRM.RetrieveUserPrivileges")
    privileges = resp.json()["RolePrivileges"]
    assert {p["PrivilegeName"] for p in privileges} == {"prvReadContact", "prvCreateContact"}
    assert all({"Depth", "PrivilegeId", "BusinessUnitId"} <= set(p) for p in privileges)
    rep = Api(dataverse_sim, make_token(oid=user["azureactivedirectoryobjectid"]))
    resp = rep("PATCH", f"contacts({new_id()})", json={"lastname": "x"})
    assert resp.status_code == 204
    resp = rep("DELETE", f"contacts({dataverse_sim.rows()[0]['contactid']})")
    assert resp.status_code == 403 and "missing prvDeleteContact privilege" in error_of(resp)[1]


def test_control_api_over_http(dataverse_sim: DataverseSimulator, api: Api) -> None:
    """The /_sim/ control API drives a simulator in another process: users, keys, config, faults, rows, log."""
    control = dataverse_sim.url + "/_sim/"
    user = requests.post(control + "users", json={"email": "x@contoso.test", "privileges": ["prvReadUser"]},
                         timeout=5).json()
    assert user["internalemailaddress"] == "x@contoso.test"
    requests.post(control + f"users/{user['systemuserid']}", json={"enabled": False, "accessmode": 4}, timeout=5)
    requests.post(control + f"users/{user['systemuserid']}/privileges", json={"privileges": ["prvReadContact"]},
                  timeout=5)
    stored = next(u for u in dataverse_sim.rows("systemusers") if u["systemuserid"] == user["systemuserid"])
    assert (stored["isdisabled"], stored["accessmode"], stored["privileges"]) == (True, 4, ["prvReadContact"])
    assert requests.post(control + "keys", json={}, timeout=5).status_code == 200
    assert requests.post(control + "config", json={"dop_hint": 3, "requests": 100}, timeout=5).status_code == 200
    assert requests.post(control + "config", json={"no_such_setting": 1}, timeout=5).status_code == 400
    requests.post(control + "faults", json={"script": [{"kind": "status", "status": 503}]}, timeout=5)
    assert api("GET", "WhoAmI").status_code == 503
    resp = api("PATCH", "contacts(externaluseridentifier='wavecnct_http')", json={"lastname": "H"})
    assert resp.status_code == 204 and resp.headers["x-ms-dop-hint"] == "3"
    rows = requests.get(control + "rows/contacts", timeout=5).json()
    assert [r["externaluseridentifier"] for r in rows] == ["wavecnct_http"]
    log = requests.get(control + "log?limit=2", timeout=5).json()
    assert [e["status"] for e in log] == [503, 204]
    assert requests.get(control + "counters", timeout=5).json()["status_503"] == 1
    assert requests.post(control + "reset", timeout=5).status_code == 200
    assert requests.get(control + "rows/contacts", timeout=5).json() == []


@pytest.mark.parametrize("https", [False, True], ids=["http", "https"])
def test_runs_as_a_process(test_certs, https: bool) -> None:
    """python -m devstack.dataverse_sim serves the Web API and the control API, over HTTP or HTTPS."""
    port = free_port()
    tls = ["--https", "--cert", str(test_certs.server_cert), "--key", str(test_certs.server_key)] if https else []
    proc = subprocess.Popen([sys.executable, "-m", "devstack.dataverse_sim", "--port", str(port), "--requests", "50",
                             *tls], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc, timeout=20, name="dataverse_sim")
        base = f"{'https' if https else 'http'}://127.0.0.1:{port}"
        verify = str(test_certs.bundle)
        resp = requests.get(base + "/api/data/v9.2/WhoAmI", headers={"Authorization": f"Bearer {make_token()}"},
                            timeout=5, verify=verify)
        assert resp.status_code == 200
        assert requests.get(base + "/_sim/config", timeout=5, verify=verify).json()["limits"]["requests"] == 50
    finally:
        stop_process(proc)


def test_many_concurrent_requests(dataverse_sim: DataverseSimulator) -> None:
    """The threaded server sustains many concurrent clients without losing writes."""
    errors: list[str] = []

    def worker(n: int) -> None:
        api = Api(dataverse_sim, make_token(oid=f"5e11e400-0000-4000-8000-{n:012d}"))
        for i in range(10):
            resp = api("PATCH", f"contacts({new_id()})", json={"lastname": f"{n}-{i}"})
            if resp.status_code != 204:
                errors.append(resp.text)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len(dataverse_sim.rows()) == 240


def test_sim_config_defaults_match_the_documented_limits() -> None:
    """the defaults are Microsoft's documented per-server numbers."""
    limits, config = Limits(), SimConfig()
    assert (limits.requests, limits.execution_ms, limits.concurrency, limits.window_seconds) == (6000, 1_200_000, 52,
                                                                                                  300)
    assert config.max_batch_requests == 1000 and config.max_page_size == 5000


def test_webapi_12_external_id_filters_use_the_index_correctly(api: Api) -> None:
    """eq/In/or on externaluseridentifier (index-assisted) agree with a full scan, case-insensitively."""
    for name in ("wavecnct_A", "wavecnct_b", "wavecnct_c"):
        contact(api, externaluseridentifier=name, lastname=name[-1])

    def ids(flt: str) -> list[str]:
        resp = api("GET", "contacts", params={"$select": "externaluseridentifier", "$filter": flt})
        assert resp.status_code == 200, resp.text
        return sorted(r["externaluseridentifier"] for r in resp.json()["value"])

    assert ids("externaluseridentifier eq 'WAVECNCT_a'") == ["wavecnct_A"]
    assert ids("externaluseridentifier eq 'wavecnct_a' or externaluseridentifier eq 'wavecnct_B'") == [
        "wavecnct_A", "wavecnct_b"]
    assert ids("externaluseridentifier eq 'wavecnct_a' or lastname eq 'c'") == ["wavecnct_A", "wavecnct_c"]
    assert ids("externaluseridentifier eq 'wavecnct_a' and lastname eq 'b'") == []
    assert ids("not (externaluseridentifier eq 'wavecnct_a')") == ["wavecnct_b", "wavecnct_c"]
    assert ids('Microsoft.Dynamics.CRM.In(PropertyName=\'externaluseridentifier\',PropertyValues=["WAVECNCT_C"])') == [
        "wavecnct_c"]
    rows = api.sim.rows()
    changed = next(r for r in rows if r["externaluseridentifier"] == "wavecnct_c")["contactid"]
    api("PATCH", f"contacts({changed})", json={"externaluseridentifier": "wavecnct_z"})
    assert ids("externaluseridentifier eq 'wavecnct_c'") == []
    assert ids("externaluseridentifier eq 'wavecnct_z'") == ["wavecnct_z"]


def test_webapi_18_limits_are_per_user_and_per_server() -> None:
    """each user has its own window, and requests spread over N servers get N windows."""
    sim = DataverseSimulator(manual_clock=True, limits=Limits(requests=2, window_seconds=10)).start()
    try:
        alice = Api(sim, make_token(oid="a11ce000-0000-4000-8000-000000000001"))
        bob = Api(sim, make_token(oid="b0b00000-0000-4000-8000-000000000002"))
        assert [alice("GET", "WhoAmI").status_code for _ in range(3)] == [200, 200, 429]
        assert [bob("GET", "WhoAmI").status_code for _ in range(2)] == [200, 200]
        sim.configure(servers=2)
        sim.protection.reset()
        assert [alice("GET", "WhoAmI").status_code for _ in range(5)] == [200, 200, 200, 200, 429]
    finally:
        sim.stop()


def test_webapi_23_execution_cost_per_record(dataverse_sim: DataverseSimulator, api: Api) -> None:
    """simulated execution time = base per request (and per inner request) + cost per record."""
    dataverse_sim.configure(base_ms=2, per_record_ms=3)
    api("POST", "contacts/Microsoft.Dynamics.CRM.UpsertMultiple", json={"Targets": [
        {"@odata.type": "Microsoft.Dynamics.CRM.contact", "contactid": new_id()} for _ in range(4)]})
    body = batch_body("b", [http_part("PATCH", f"contacts({new_id()})", {"lastname": str(i)}) for i in range(3)])
    api("POST", "$batch", data=body, headers={"Content-Type": "multipart/mixed; boundary=b"})
    assert [e["exec_ms"] for e in dataverse_sim.request_log()] == [2 + 3 * 4, 2 * (1 + 3) + 3 * 3]


def test_webapi_15_batches_cannot_be_nested(api: Api) -> None:
    """a $batch inside a $batch is refused."""
    body = batch_body("b", [http_part("POST", "/api/data/v9.2/$batch", {})])
    resp = api("POST", "$batch", data=body, headers={"Content-Type": "multipart/mixed; boundary=b"})
    assert resp.status_code == 400 and "cannot be nested" in resp.text


def test_simulator_bugs_answer_500_and_are_recorded(dataverse_sim: DataverseSimulator, api: Api,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected exception inside the simulator answers 500 0x80040216 and is kept for the test to see."""
    def boom(*args, **kwargs):
        raise RuntimeError("bug")

    monkeypatch.setattr(dataverse_sim.api, "handle", boom)
    resp = api("GET", "WhoAmI")
    assert resp.status_code == 500 and error_of(resp)[0] == "0x80040216"
    assert dataverse_sim.internal_errors == ["GET /api/data/v9.2/WhoAmI: RuntimeError: bug"]
    dataverse_sim.internal_errors.clear()
