"""The Dataverse operations contact sync uses, over dataverse/transport.py (which retries, refreshes the
token and keeps Dataverse's penalties).

    client = DataverseClient(instance_url, token_provider, verify=ca_bundle_or_True, session=None)
    token_provider(force_refresh: bool = False) -> str     # an access token for the instance

    whoami() -> WhoAmI
    retrieve_user_privileges(user_id) -> set[str]
    find_contacts(external_ids) -> dict[external_id, list[ContactRef]]    (batched, chunked by URL length)
    upsert_contact(contact_id, payload, *, reactivate=False) -> WriteResult     PATCH contacts(<id>)
    delete_contact(contact_id, *, etag=None) -> bool           False when it was already gone
    deactivate_contact(contact_id) -> bool
    delete_contacts(contact_ids, *, deactivate=False) -> dict[contactid, DataverseError]
                                                               many rows; the ones Dynamics refused
    find_users_by_email(emails) -> dict[normalised email, list[UserRef]]
    bulk_upsert_supported() -> bool                            UpsertMultiple available for contact
    bulk_upsert(items, *, method=None) -> BulkResult
    requests_made                                              requests sent by the calling thread (for reports)
    dop_hint                                                   the last x-ms-dop-hint seen (int or None)
    budget                                                     the user's shared penalties and concurrency

Reactivation: Dataverse treats inactive contacts as read-only. A contact deactivated by the `deactivate`
delete policy comes back when a newer Wave update arrives: pass reactivate=True (the ContactRef from a
lookup says statecode 1) and the same PATCH sets statecode 0 / statuscode 1 with the new values
(https://learn.microsoft.com/power-apps/developer/data-platform/webapi/update-delete-entities-using-web-api).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Unpack

import requests

from core.emails import normalise_email
from dataverse.batch import BatchFormatError, BatchPart, PartResponse, build_batch, parse_batch_response
from dataverse.budget import Budget
from dataverse.errors import (
    AuthExpired,
    Conflict,
    DataverseError,
    NotFound,
    PermissionDenied,
    Throttled,
    Transient,
    ValidationFailed,
    error_for,
)
from dataverse.odata import in_filter, in_filter_chunks
from dataverse.transport import API_PATH, JsonBody, TokenProvider, Transport, TransportOptions

CONTACT_TYPE = "Microsoft.Dynamics.CRM.contact"
EXTERNAL_ID = "externaluseridentifier"
CONTACT_SELECT = "contactid,externaluseridentifier,statecode,_ownerid_value,createdon"
ACTIVE = {"statecode": 0, "statuscode": 1}
INACTIVE = {"statecode": 1, "statuscode": 2}



@dataclass(frozen=True)
class WhoAmI:
    user_id: str
    business_unit_id: str
    organization_id: str


@dataclass(frozen=True)
class ContactRef:
    contactid: str
    etag: str | None
    statecode: int | None
    externaluseridentifier: str | None
    owner: str | None  # _ownerid_value
    createdon: str | None = None


@dataclass(frozen=True)
class UserRef:
    systemuserid: str
    email: str
    accessmode: int | None
    fullname: str | None
    disabled: bool = False


@dataclass(frozen=True)
class WriteResult:
    contactid: str
    etag: str | None
    created: bool


@dataclass(frozen=True)
class UpsertItem:
    key: str  # the caller's name for the record in the report (e.g. the Wave contact id)
    contact_id: str  # the row's contactid: existing, or the deterministic id for a new one
    payload: dict[str, Any]  # sync.mapping payload, externaluseridentifier included
    reactivate: bool = False


@dataclass(frozen=True)
class RecordFailure:
    key: str
    field: str | None
    code: str
    message: str
    category: str = "validation"


@dataclass
class BulkResult:
    succeeded: list[str] = field(default_factory=list)  # item keys
    failed: list[RecordFailure] = field(default_factory=list)
    requests_made: int = 0
    method: str = ""  # "UpsertMultiple" or "$batch"


def _contact_ref(row: dict[str, Any]) -> ContactRef:
    return ContactRef(row["contactid"], row.get("@odata.etag"), row.get("statecode"),
                      row.get(EXTERNAL_ID), row.get("_ownerid_value"), row.get("createdon"))


class DataverseClient:
    def __init__(
        self,
        instance_url: str,
        token_provider: TokenProvider | Callable[..., str],
        *,
        url_budget: int = 16_000,  # encoded $filter length per lookup request (Dataverse takes URLs to 32 KB)
        upsert_multiple_size: int = 500,
        batch_size: int = 100,
        **options: Unpack[TransportOptions],
    ) -> None:
        self.transport = Transport(instance_url, token_provider, **options)
        self.instance_url = self.transport.instance_url
        self.api_url = self.transport.api_url
        self.url_budget = url_budget
        self.upsert_multiple_size = upsert_multiple_size
        self.batch_size = min(batch_size, 1000)
        self._upsert_multiple: bool | None = None

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> DataverseClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def requests_made(self) -> int:
        """HTTP requests the calling thread has sent through this client (retries included)."""
        return self.transport.requests_made

    @property
    def dop_hint(self) -> int | None:
        return self.transport.dop_hint

    @property
    def budget(self) -> Budget:
        """The Dataverse user's penalties and concurrency, as every instance shares them (dataverse/budget.py)."""
        return self.transport.budget

    @property
    def max_inline_wait(self) -> float:
        """The longest 429 penalty a call waits out inline before raising Throttled."""
        return self.transport.max_inline_wait

    def request(self, method: str, path: str, *, params: dict[str, str] | None = None, body: JsonBody | None = None,
                data: bytes | None = None, headers: dict[str, str] | None = None, rows: int = 0) -> requests.Response:
        return self.transport.request(method, path, params=params, body=body, data=data, headers=headers, rows=rows)

    def _get_all(self, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
        return self.transport.get_all(path, params)

    # -- identity and privileges -----------------------------------------------------------------

    def whoami(self) -> WhoAmI:
        data = self.request("GET", "WhoAmI").json()
        return WhoAmI(data["UserId"], data["BusinessUnitId"], data["OrganizationId"])

    def retrieve_user_privileges(self, user_id: str) -> set[str]:
        data = self.request("GET", f"systemusers({user_id})/Microsoft.Dynamics.CRM.RetrieveUserPrivileges").json()
        return {p["PrivilegeName"] for p in data.get("RolePrivileges", [])}

    # -- contact lookups -------------------------------------------------------------------------

    def find_contacts(self, external_ids: Iterable[str]) -> dict[str, list[ContactRef]]:
        """Every row of each external id found: several when rows were made before this integration
        (which one to use is sync/rules.py pick_row's choice)."""
        wanted = list(dict.fromkeys(external_ids))
        found: dict[str, list[dict[str, Any]]] = {}
        for chunk in in_filter_chunks(wanted, lambda c: in_filter(EXTERNAL_ID, c), self.url_budget):
            rows = self._get_all("contacts", {"$select": CONTACT_SELECT, "$filter": in_filter(EXTERNAL_ID, chunk)})
            exact = set(chunk)
            for row in rows:
                # Dataverse compares strings case-insensitively; Wave ids are case-sensitive.
                if row.get(EXTERNAL_ID) in exact:
                    found.setdefault(row[EXTERNAL_ID], []).append(row)
        return {ext: [_contact_ref(r) for r in rows] for ext, rows in found.items()}

    # -- contact writes --------------------------------------------------------------------------

    def _write(self, path: str, payload: dict[str, Any], headers: dict[str, str]) -> WriteResult:
        resp = self.request("PATCH", path, params={"$select": "contactid,statecode"}, body=payload,
                            headers={"Prefer": "return=representation", **headers})
        data = resp.json()
        return WriteResult(data["contactid"], data.get("@odata.etag"), resp.status_code == 201)

    def upsert_contact(self, contact_id: str, payload: dict[str, Any], *, reactivate: bool = False) -> WriteResult:
        """Create-or-update by contactid. With the deterministic id, racing creates converge on one row."""
        body = {**payload, **ACTIVE} if reactivate else payload
        return self._write(f"contacts({contact_id})", body, {})

    def delete_contact(self, contact_id: str, *, etag: str | None = None) -> bool:
        part = self._removal(contact_id, False)
        return self._send_removal(BatchPart(part.method, part.url, headers={"If-Match": etag}) if etag else part)

    def deactivate_contact(self, contact_id: str) -> bool:
        return self._send_removal(self._removal(contact_id, True))

    def delete_contacts(self, contact_ids: Sequence[str], *, deactivate: bool = False) -> dict[str, DataverseError]:
        """Delete (or deactivate) many rows; returns the error of each row Dynamics refused, by contactid.

        One row is one request. More go in continue-on-error `$batch` requests of up to `batch_size`
        independent operations: no change set, so a row Dynamics refuses fails alone and the others are
        deleted; the batch counts as one request against service protection but is charged every part's
        execution time (research/dataverse.md §5, §6). A row already gone (404) counts as done, as in
        delete_contact, so sending a batch again after a failure deletes nothing twice. Throttled,
        Transient and AuthExpired (of the request, or of a part) are raised; the rows deleted before stay
        deleted."""
        unique = list(dict.fromkeys(contact_ids))
        refused: dict[str, DataverseError] = {}
        for i in range(0, len(unique), self.batch_size):
            chunk = unique[i : i + self.batch_size]
            refused.update(self._remove_one(chunk[0], deactivate) if len(chunk) == 1
                           else self._remove_batch(chunk, deactivate))
        return refused

    @staticmethod
    def _removal(contact_id: str, deactivate: bool) -> BatchPart:
        if deactivate:  # update only: a row already gone answers 404, not a new inactive row
            return BatchPart("PATCH", f"contacts({contact_id})", INACTIVE, {"If-Match": "*"})
        return BatchPart("DELETE", f"contacts({contact_id})")

    def _send_removal(self, part: BatchPart) -> bool:
        """One removal as a request of its own; False when the row was already gone."""
        try:
            self.request(part.method, part.url, body=part.body, headers=part.headers or None)
        except NotFound:
            return False
        return True

    def _remove_one(self, contact_id: str, deactivate: bool) -> dict[str, DataverseError]:
        try:
            self._send_removal(self._removal(contact_id, deactivate))
        except (Throttled, Transient, AuthExpired):
            raise
        except DataverseError as exc:
            return {contact_id: exc}
        return {}

    def _remove_batch(self, contact_ids: list[str], deactivate: bool) -> dict[str, DataverseError]:
        responses = self._batch([self._removal(cid, deactivate) for cid in contact_ids])
        refused: dict[str, DataverseError] = {}
        retryable: DataverseError | None = None
        for cid, part in zip(contact_ids, responses, strict=True):
            if part.status < 400 or part.status == 404:
                continue
            error = error_for(part.status, part.body, part.headers)
            if isinstance(error, (Throttled, Transient, AuthExpired)):
                retryable = retryable or error
            else:
                refused[cid] = error
        if retryable is not None:
            raise retryable
        return refused

    # -- users -----------------------------------------------------------------------------------

    def find_users_by_email(self, emails: Iterable[str]) -> dict[str, list[UserRef]]:
        """Enabled systemusers by internal email (ASCII case-insensitive), keyed by the normalised email:
        every user of an email (which one owns is sync/rules.py choose_owner's choice)."""
        wanted = list(dict.fromkeys(e for e in (normalise_email(x) for x in emails) if e))
        wanted_set = set(wanted)
        by_email: dict[str, list[dict[str, Any]]] = {}

        def make_filter(chunk: list[str]) -> str:
            return f"isdisabled eq false and {in_filter('internalemailaddress', chunk)}"

        for chunk in in_filter_chunks(wanted, make_filter, self.url_budget):
            rows = self._get_all("systemusers", {
                "$select": "systemuserid,internalemailaddress,isdisabled,accessmode,fullname",
                "$filter": make_filter(chunk)})
            for row in rows:
                email = normalise_email(row.get("internalemailaddress")) or ""
                if email in wanted_set and not row.get("isdisabled"):
                    by_email.setdefault(email, []).append(row)
        return {email: [UserRef(r["systemuserid"], r.get("internalemailaddress") or "", r.get("accessmode"),
                                r.get("fullname"), bool(r.get("isdisabled"))) for r in rows]
                for email, rows in by_email.items()}

    # -- capabilities ----------------------------------------------------------------------------

    def bulk_upsert_supported(self, refresh: bool = False) -> bool:
        if refresh or self._upsert_multiple is None:
            rows = self.request("GET", "sdkmessagefilters", params={
                "$select": "sdkmessagefilterid",
                "$filter": "sdkmessageid/name eq 'UpsertMultiple' and primaryobjecttypecode eq 'contact'",
            }).json().get("value", [])
            self._upsert_multiple = bool(rows)
        return self._upsert_multiple

    # -- bulk ------------------------------------------------------------------------------------

    @staticmethod
    def _target(item: UpsertItem) -> tuple[str, dict[str, Any]]:
        """(URL of the row, body without identity) for one item."""
        body = {**item.payload, **ACTIVE} if item.reactivate else dict(item.payload)
        return f"contacts({item.contact_id})", body

    def bulk_upsert(self, items: Sequence[UpsertItem], *, method: str | None = None) -> BulkResult:
        """Upsert many contacts: UpsertMultiple when the table offers it (else a continue-on-error $batch).

        A rejected request is split in halves until the bad records are isolated, so every good record
        lands and each bad one is reported with its field and reason. Throttled, Transient, AuthExpired
        and PermissionDenied are raised (the records that already landed stay: every write is an upsert).
        Rows are addressed by `item.contact_id` (the existing row's id, or the deterministic id for a new
        one), so the caller knows every row's id afterwards.
        `method` forces "UpsertMultiple" or "$batch" (default: UpsertMultiple when the table offers it).
        """
        start = self.requests_made
        if method is None:
            method = "UpsertMultiple" if self.bulk_upsert_supported() else "$batch"
        unique = list({i.contact_id: i for i in items}.values())
        result = BulkResult(method=method)
        send = self._send_upsert_multiple if method == "UpsertMultiple" else self._send_batch
        size = self.upsert_multiple_size if method == "UpsertMultiple" else self.batch_size
        for i in range(0, len(unique), size):
            self._bisect(unique[i : i + size], send, result)
        superseded = {i.key for i in items} - {i.key for i in unique}  # duplicates of a later snapshot
        result.succeeded += sorted(superseded)
        result.requests_made = self.requests_made - start
        return result

    def _bisect(self, items: list[UpsertItem], send: Callable[[list[UpsertItem]], list[RecordFailure]],
                result: BulkResult) -> None:
        try:
            failures = send(items)
        except (ValidationFailed, NotFound, Conflict) as err:
            if len(items) == 1:
                failures = [RecordFailure(items[0].key, getattr(err, "field", None) or _field_of(err), err.code,
                                          err.message, err.category)]
            else:
                middle = len(items) // 2
                self._bisect(items[:middle], send, result)
                self._bisect(items[middle:], send, result)
                return
        failed = {f.key for f in failures}
        result.failed += failures
        result.succeeded += [i.key for i in items if i.key not in failed]

    def _send_upsert_multiple(self, items: list[UpsertItem]) -> list[RecordFailure]:
        targets = []
        for item in items:
            _, body = self._target(item)
            targets.append({"@odata.type": CONTACT_TYPE, **body, "contactid": item.contact_id})
        self.request("POST", "contacts/Microsoft.Dynamics.CRM.UpsertMultiple", body={"Targets": targets},
                     rows=len(targets))
        return []  # all or nothing on standard tables: success means every record landed

    def _batch(self, parts: list[BatchPart]) -> list[PartResponse]:
        """One continue-on-error `$batch` of independent requests; each part's response, in order."""
        content_type, data = build_batch(parts, API_PATH)
        resp = self.request("POST", "$batch", data=data, rows=len(parts),
                            headers={"Content-Type": content_type, "Prefer": "odata.continue-on-error"})
        try:
            responses = parse_batch_response(resp.headers.get("Content-Type", ""), resp.content)
        except BatchFormatError as exc:
            raise Transient(f"unreadable $batch response: {exc}") from None
        if len(responses) != len(parts):
            raise Transient(f"$batch answered {len(responses)} parts for {len(parts)} requests")
        return responses

    def _send_batch(self, items: list[UpsertItem]) -> list[RecordFailure]:
        responses = self._batch([BatchPart("PATCH", url, body) for url, body in map(self._target, items)])
        failures: list[RecordFailure] = []
        retryable: DataverseError | None = None
        for item, part in zip(items, responses, strict=True):
            if part.status < 400:
                continue
            error = error_for(part.status, part.body, part.headers)
            if isinstance(error, (Throttled, Transient, AuthExpired, PermissionDenied)):
                retryable = retryable or error
            else:
                failures.append(RecordFailure(item.key, getattr(error, "field", None) or _field_of(error),
                                              error.code, error.message, error.category))
        if retryable is not None:
            raise retryable
        return failures


def _field_of(error: DataverseError) -> str | None:
    if isinstance(error, NotFound) and error.entity in ("systemuser", "team"):
        return "ownerid"
    return None
