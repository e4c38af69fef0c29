"""Web API semantics of the simulator: one request (already authenticated and admitted) -> one response.

Used for top-level requests and for each request inside a `$batch`. Entity sets: contacts, systemusers,
teams, sdkmessagefilters, EntityDefinitions(...)/Keys; functions/actions: WhoAmI, RetrieveUserPrivileges,
CreateMultiple/UpdateMultiple/UpsertMultiple, $batch.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from devstack.dataverse import multipart
from devstack.dataverse.errors import SimError, not_found, privilege_id
from devstack.dataverse.odata import GUID_RE, format_key, index_hint, parse_filter, parse_key, query_error
from devstack.dataverse.store import (
    CONTACT_COLUMNS,
    TEAM_COLUMNS,
    USER_COLUMNS,
    Caller,
    Store,
    etag,
)

API_PREFIX = "/api/data/v9.2/"
JSON = "application/json; odata.metadata=minimal"
BULK_MESSAGES = ("CreateMultiple", "UpdateMultiple", "UpsertMultiple")
_KEY_NOT_VALID = (
    "The key in the request URI is not valid for resource 'Microsoft.Dynamics.CRM.contact'. Ensure that the names "
    "and number of key properties match the declared or alternate key properties for the resource "
    "'Microsoft.Dynamics.CRM.contact'."
)
_MISSING_TYPE = (
    "Error identified in Payload provided by the user for Entity :'', For more information on this error please "
    "follow this help link https://go.microsoft.com/fwlink/?linkid=2195293  ----> InnerException : "
    "Microsoft.OData.ODataException: A resource without a type name was found, but no expected type was "
    "specified. To allow entries without type information, the expected type must also be specified when the "
    "model is specified."
)
SDK_MESSAGE_COLUMNS = frozenset({"sdkmessagefilterid", "primaryobjecttypecode", "sdkmessageid/name", "sdkmessageid"})


@dataclass
class SimConfig:
    dop_hint: int = 8
    base_ms: float = 5.0  # simulated execution time of any request (or of each request inside a $batch)
    per_record_ms: float = 10.0  # plus this per row written
    per_read_row_ms: float = 0.05
    sleep_fraction: float = 0.0  # really sleep this fraction of the simulated execution time
    bulk_messages: set[str] = field(default_factory=lambda: set(BULK_MESSAGES))
    max_batch_requests: int = 1000
    max_url_length: int = 32768
    max_page_size: int = 5000
    check_audience: bool = False
    auto_create_users: bool = True
    authorization_uri: str = "https://login.microsoftonline.com/common/oauth2/authorize"


@dataclass
class Request:
    method: str
    target: str  # path after the API prefix, with its query string
    headers: dict[str, str]  # lower-case names
    body: bytes = b""

    def __post_init__(self) -> None:
        parts = urlsplit(self.target)
        self.path = unquote(parts.path)
        self.raw_query = parts.query
        self.query = dict(parse_qsl(parts.query, keep_blank_values=True))

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except (ValueError, UnicodeDecodeError):
            raise SimError(400, "0x80048d19", "The request body is not valid JSON.") from None

    def prefers(self) -> dict[str, str]:
        prefs = {}
        for item in self.headers.get("prefer", "").split(","):
            name, _, value = item.strip().partition("=")
            if name:
                prefs[name.strip().lower()] = value.strip().strip('"')
        return prefs


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    writes: int = 0
    reads: int = 0
    inner_requests: int = 0
    exec_ms: float = 0.0  # simulated execution time, filled in by the server
    user: str | None = None

    @classmethod
    def of_json(cls, status: int, data: Any, **kw: Any) -> Response:
        return cls(status, {"Content-Type": JSON, "OData-Version": "4.0"}, json.dumps(data).encode(), **kw)

    @classmethod
    def of_error(cls, err: SimError) -> Response:
        return cls(err.status, {"Content-Type": JSON, "OData-Version": "4.0", **err.headers},
                   json.dumps(err.body()).encode())


def split_segments(path: str) -> list[tuple[str, str | None]]:
    """'contacts(a=\'x/y\')/Microsoft.X' -> [('contacts', "a='x/y'"), ('Microsoft.X', None)], quote-aware."""
    segments, i, n = [], 0, len(path)
    while i < n:
        j = i
        while j < n and path[j] not in "(/":
            j += 1
        name, key = path[i:j], None
        if j < n and path[j] == "(":
            depth, k, quoted = 0, j, False
            while k < n:
                ch = path[k]
                if ch == "'":
                    quoted = not quoted
                elif not quoted and ch == "(":
                    depth += 1
                elif not quoted and ch == ")":
                    depth -= 1
                    if depth == 0:
                        break
                k += 1
            if k >= n:
                raise query_error(f"Bad Request - Error in query syntax: unbalanced parentheses in '{path}'.")
            key, j = path[j + 1 : k], k + 1
        segments.append((name, key))
        if j < n and path[j] == "/":
            j += 1
        elif j < n:
            raise query_error(f"Bad Request - Error in query syntax in '{path}'.")
        i = j
    return segments


def _segment_not_found(name: str) -> SimError:
    return SimError(404, "0x80060888", f"Resource not found for the segment '{name}'.")


class WebApi:
    def __init__(self, store: Store, config: SimConfig, origin: Callable[[], str]) -> None:
        self.store = store
        self.config = config
        self.origin = origin

    @property
    def base(self) -> str:
        return self.origin() + API_PREFIX

    # -- dispatch --------------------------------------------------------------------------------

    def handle(self, caller: Caller, req: Request) -> Response:
        try:
            return self._route(caller, req)
        except SimError as err:
            return Response.of_error(err)

    def _route(self, caller: Caller, req: Request) -> Response:
        segments = split_segments(req.path.strip("/"))
        if not segments:
            raise _segment_not_found("")
        (name, key), rest = segments[0], segments[1:]
        m = req.method
        if name in ("WhoAmI", "WhoAmI()") and not rest and m == "GET":
            return self._whoami(caller)
        if name == "$batch" and m == "POST":
            return self._batch(caller, req)
        if name == "contacts":
            if key is None and not rest:
                if m == "GET":
                    return self._query(caller, req, "contacts")
                if m == "POST":
                    return self._create(caller, req)
                raise SimError(405, "0x80060888",
                               f"The HTTP method '{m}' is not allowed for the collection 'contacts'.")
            if key is None and len(rest) == 1 and m == "POST":
                return self._bulk(caller, req, rest[0][0])
            if key is not None and not rest:
                if m == "GET":
                    return self._get_contact(caller, req, key)
                if m == "PATCH":
                    return self._patch(caller, req, key)
                if m == "DELETE":
                    return self._delete(caller, req, key)
        if name == "systemusers":
            if key is None and not rest and m == "GET":
                return self._query(caller, req, "systemusers")
            if key is not None and m == "GET":
                return self._user(caller, req, key, rest)
        if name == "teams" and key is None and not rest and m == "GET":
            return self._query(caller, req, "teams")
        if name == "sdkmessagefilters" and key is None and not rest and m == "GET":
            return self._query(caller, req, "sdkmessagefilters")
        if name == "EntityDefinitions" and key is not None and rest == [("Keys", None)] and m == "GET":
            return self._keys(key, req)
        raise _segment_not_found(name if not rest else rest[-1][0])

    # -- functions ------------------------------------------------------------------------------

    def _whoami(self, caller: Caller) -> Response:
        return Response.of_json(200, {
            "@odata.context": f"{self.base}$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse",
            "BusinessUnitId": self.store.business_unit_id,
            "UserId": caller.user["systemuserid"],
            "OrganizationId": self.store.organization_id,
        })

    def _user(self, caller: Caller, req: Request, key: str, rest: list) -> Response:
        caller.require("prvReadUser", "systemuser")
        user_id = parse_key(key).get("") or ""
        with self.store.lock:
            user = self.store.users.get(user_id)
            if user is None:
                raise not_found("systemuser", user_id or key)
            if not rest:
                return Response.of_json(200, {"@odata.context": f"{self.base}$metadata#systemusers/$entity",
                                              **self._public(user, "systemusers", self._select(req, "systemusers"))})
            if rest == [("Microsoft.Dynamics.CRM.RetrieveUserPrivileges", None)]:
                privileges = [
                    {"Depth": depth, "PrivilegeId": privilege_id(name), "BusinessUnitId": self.store.business_unit_id,
                     "PrivilegeName": name}
                    for name, depth in sorted(user["privileges"].items())
                ]
                return Response.of_json(200, {
                    "@odata.context": f"{self.base}$metadata#Microsoft.Dynamics.CRM.RetrieveUserPrivilegesResponse",
                    "RolePrivileges": privileges})
        raise _segment_not_found(rest[-1][0])

    def _keys(self, key: str, req: Request) -> Response:
        logical = parse_key(key).get("LogicalName")
        if logical != "contact":
            raise SimError(404, "0x80040217", f"Could not find an entity with name {logical}.")
        with self.store.lock:
            rows = [{"MetadataId": str(uuid.uuid5(uuid.NAMESPACE_OID, k.name)), "LogicalName": k.name,
                     "SchemaName": k.name, "KeyAttributes": list(k.columns), "EntityKeyIndexStatus": k.status}
                    for k in self.store.keys]
        select = [s for s in req.query.get("$select", "").split(",") if s]
        if select:
            rows = [{k: v for k, v in r.items() if k in select or k == "MetadataId"} for r in rows]
        return Response.of_json(200, {"@odata.context": f"{self.base}$metadata#EntityDefinitions('contact')/Keys",
                                      "value": rows})

    # -- reads ----------------------------------------------------------------------------------

    def _columns(self, entity_set: str) -> frozenset[str]:
        return {"contacts": CONTACT_COLUMNS, "systemusers": USER_COLUMNS, "teams": TEAM_COLUMNS,
                "sdkmessagefilters": SDK_MESSAGE_COLUMNS}[entity_set]

    def _check_property(self, entity_set: str) -> Callable[[str], None]:
        columns = self._columns(entity_set)
        logical = {"contacts": "contact", "systemusers": "systemuser", "teams": "team",
                   "sdkmessagefilters": "sdkmessagefilter"}[entity_set]

        def check(name: str) -> None:
            if name not in columns:
                raise query_error(f"Could not find a property named '{name}' on type "
                                  f"'Microsoft.Dynamics.CRM.{logical}'.")
        return check

    def _select(self, req: Request, entity_set: str) -> list[str] | None:
        raw = req.query.get("$select")
        if not raw:
            return None
        names = [s.strip() for s in raw.split(",") if s.strip()]
        check = self._check_property(entity_set)
        for name in names:
            check(name)
        return names

    def _public(self, row: dict[str, Any], entity_set: str, select: list[str] | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if entity_set == "contacts":
            out["@odata.etag"] = etag(row)
        columns = select or sorted(self._columns(entity_set))
        primary = {"contacts": "contactid", "systemusers": "systemuserid", "teams": "teamid",
                   "sdkmessagefilters": "sdkmessagefilterid"}[entity_set]
        for name in [*columns, primary]:
            if "/" not in name and name != "sdkmessageid":
                out[name] = row.get(name)
        return out

    def _rows(self, entity_set: str) -> list[dict[str, Any]]:
        if entity_set == "contacts":
            return list(self.store.contacts.values())
        if entity_set == "systemusers":
            return list(self.store.users.values())
        if entity_set == "teams":
            return list(self.store.teams.values())
        messages = ["Create", "Update", "Delete", "Upsert", *sorted(self.config.bulk_messages)]
        return [{"sdkmessagefilterid": str(uuid.uuid5(uuid.NAMESPACE_OID, f"filter/contact/{m}")),
                 "primaryobjecttypecode": "contact", "sdkmessageid": {"name": m}} for m in messages]

    def _query(self, caller: Caller, req: Request, entity_set: str) -> Response:
        if entity_set == "contacts":
            caller.require("prvReadContact")
        elif entity_set == "systemusers":
            caller.require("prvReadUser", "systemuser")
        q = req.query
        if "$skip" in q:
            raise query_error("The query parameter $skip is not supported.")
        unsupported = {k for k in q if k.startswith("$")} - {"$filter", "$select", "$top", "$orderby",
                                                             "$skiptoken", "$count"}
        if unsupported:
            raise query_error(f"The query option '{sorted(unsupported)[0]}' is not supported by the simulator.")
        check = self._check_property(entity_set)
        predicate = parse_filter(q["$filter"], check) if q.get("$filter") else (lambda row: True)
        select = self._select(req, entity_set)
        order: list[tuple[str, bool]] = []
        for item in filter(None, (s.strip() for s in q.get("$orderby", "").split(","))):
            name, _, direction = item.partition(" ")
            check(name)
            order.append((name, direction.strip().lower() == "desc"))
        primary = {"contacts": "contactid", "systemusers": "systemuserid", "teams": "teamid",
                   "sdkmessagefilters": "sdkmessagefilterid"}[entity_set]

        def sort_key(row: dict[str, Any]) -> list:
            return [[row.get(n) is None, str(row.get(n) or "").casefold()] for n, _ in order] + [row[primary]]

        hint = index_hint(predicate)
        with self.store.lock:
            if entity_set == "contacts" and hint is not None and hint[0] == "externaluseridentifier":
                candidates = self.store.with_external_ids(hint[1])
            else:
                candidates = self._rows(entity_set)
            rows = [r for r in candidates if predicate(r)]
        total = len(rows)
        for name, desc in reversed(order):
            rows.sort(key=lambda r, n=name: (r.get(n) is None, str(r.get(n) or "").casefold()), reverse=desc)
        if not order:
            rows.sort(key=lambda r: r[primary])
        prefs = req.prefers()
        page_size = None
        headers: dict[str, str] = {}
        if "odata.maxpagesize" in prefs:
            try:
                page_size = max(1, min(int(prefs["odata.maxpagesize"]), self.config.max_page_size))
            except ValueError:
                raise query_error("odata.maxpagesize must be an integer.") from None
            headers["Preference-Applied"] = f"odata.maxpagesize={page_size}"
        elif "$top" in q:
            try:
                rows = rows[: max(0, int(q["$top"]))]
            except ValueError:
                raise query_error(f"Invalid value '{q['$top']}' for $top.") from None
        if page_size is None:
            page_size = self.config.max_page_size
        if q.get("$skiptoken"):
            try:
                after = json.loads(base64.urlsafe_b64decode(q["$skiptoken"].encode()))
            except ValueError:
                raise query_error("The $skiptoken is not valid.") from None
            rows = [r for r in rows if self._after(sort_key(r), after, order)]
        page, more = rows[:page_size], len(rows) > page_size
        body: dict[str, Any] = {
            "@odata.context": f"{self.base}$metadata#{entity_set}" + (f"({','.join(select)})" if select else ""),
        }
        if q.get("$count") == "true":
            body["@odata.count"] = min(total, 5000)
        body["value"] = [self._public(r, entity_set, select) for r in page]
        if more:
            token = base64.urlsafe_b64encode(json.dumps(sort_key(page[-1])).encode()).decode()
            params = [(k, v) for k, v in parse_qsl(req.raw_query, keep_blank_values=True) if k != "$skiptoken"]
            query = urlencode([*params, ("$skiptoken", token)], quote_via=quote, safe="$'(),=/:@")
            body["@odata.nextLink"] = f"{self.base}{entity_set}?{query}"
        resp = Response.of_json(200, body, reads=len(page))
        resp.headers.update(headers)
        return resp

    @staticmethod
    def _after(key: list, after: list, order: list[tuple[str, bool]]) -> bool:
        for (k, a), (_, desc) in zip(zip(key, after, strict=False), [*order, ("", False)], strict=False):
            if k != a:
                return (k < a) if desc else (k > a)
        return False

    # -- contact reads/writes -------------------------------------------------------------------

    def _resolve_key(self, key: str) -> tuple[str | None, dict[str, Any] | None]:
        """(contactid, None) for a primary key, (None, key dict) for an active alternate key."""
        parsed = parse_key(key)
        if list(parsed) in ([""], ["contactid"]):
            value = str(parsed.get("") or parsed.get("contactid")).lower()
            if not GUID_RE.fullmatch(value):
                raise query_error(_KEY_NOT_VALID)
            return value, None
        if self.store.active_key(set(parsed)) is None:
            raise SimError(400, "0x80060888", _KEY_NOT_VALID)
        return None, parsed

    def _locate(self, key: str) -> tuple[str, dict[str, Any] | None, dict[str, Any] | None]:
        """(contactid or '', current row or None, alternate key or None)."""
        contact_id, alt = self._resolve_key(key)
        if alt is not None:
            row = self.store.find_by_key(alt)
            return (row["contactid"] if row else ""), row, alt
        return contact_id or "", self.store.contacts.get(contact_id or ""), None

    def _missing(self, contact_id: str, alt: dict[str, Any] | None) -> SimError:
        if alt is not None:
            return SimError(404, "0x80040217",
                            "A record with the specified key values does not exist in contact entity")
        return not_found("contact", contact_id)

    def _get_contact(self, caller: Caller, req: Request, key: str) -> Response:
        caller.require("prvReadContact")
        select = self._select(req, "contacts")
        with self.store.lock:
            contact_id, row, alt = self._locate(key)
            if row is None:
                raise self._missing(contact_id, alt)
            inm = req.headers.get("if-none-match", "")
            if inm and inm != "null" and inm == etag(row) and "odata.include-annotations" not in req.prefers():
                return Response(304, {"OData-Version": "4.0"})
            return Response.of_json(200, {"@odata.context": f"{self.base}$metadata#contacts/$entity",
                                          **self._public(row, "contacts", select)}, reads=1)

    def _written(self, req: Request, row: dict[str, Any], created: bool, entity_id: str,
                 updated_status: int = 200) -> Response:
        if req.prefers().get("return") == "representation":
            body = {"@odata.context": f"{self.base}$metadata#contacts/$entity",
                    **self._public(row, "contacts", self._select(req, "contacts"))}
            resp = Response.of_json(201 if created else updated_status, body, writes=1)
            resp.headers["Preference-Applied"] = "return=representation"
            return resp
        return Response(204, {"OData-Version": "4.0", "OData-EntityId": entity_id}, writes=1)

    def _create(self, caller: Caller, req: Request) -> Response:
        body = req.json()
        if not isinstance(body, dict):
            raise SimError(400, "0x80048d19", "The request body must be a JSON object.")
        row = self.store.create(caller, body)
        return self._written(req, row, True, f"{self.base}contacts({row['contactid']})")

    def _check_preconditions(self, req: Request, row: dict[str, Any] | None, contact_id: str,
                             alt: dict[str, Any] | None) -> None:
        if_match = req.headers.get("if-match")
        if_none_match = req.headers.get("if-none-match")
        if if_match:
            if row is None:
                raise self._missing(contact_id, alt)
            if if_match != "*" and if_match != etag(row) and if_match != etag(row)[2:]:
                raise SimError(412, "0x80060882",
                               "The version of the existing record doesn't match the RowVersion property provided.")
        if if_none_match and if_none_match != "null" and row is not None:
            raise SimError(412, "0x80040237", "A record with matching key values already exists.")

    def _patch(self, caller: Caller, req: Request, key: str) -> Response:
        body = req.json()
        if not isinstance(body, dict):
            raise SimError(400, "0x80048d19", "The request body must be a JSON object.")
        with self.store.lock:
            contact_id, row, alt = self._locate(key)
            self._check_preconditions(req, row, contact_id, alt)
            entity_id = f"{self.base}contacts({format_key(alt) if alt else contact_id})"
            if row is not None:
                if alt:  # key values in the body are ignored on update
                    body = {k: v for k, v in body.items() if k not in alt}
                return self._written(req, self.store.update(caller, row["contactid"], body), False, entity_id)
            created = self.store.create(caller, body, contact_id=contact_id or None, key=alt)
            return self._written(req, created, True, entity_id)

    def _delete(self, caller: Caller, req: Request, key: str) -> Response:
        with self.store.lock:
            contact_id, row, alt = self._locate(key)
            if row is None:
                raise self._missing(contact_id, alt)
            self._check_preconditions(req, row, contact_id, alt)
            self.store.delete(caller, row["contactid"])
            return Response(204, {"OData-Version": "4.0"}, writes=1)

    # -- bulk -----------------------------------------------------------------------------------

    def _bulk(self, caller: Caller, req: Request, action: str) -> Response:
        message = action.removeprefix("Microsoft.Dynamics.CRM.")
        if not action.startswith("Microsoft.Dynamics.CRM.") or message not in BULK_MESSAGES \
                or message not in self.config.bulk_messages:
            raise _segment_not_found(action)
        body = req.json()
        targets = body.get("Targets") if isinstance(body, dict) else None
        if not isinstance(targets, list) or not targets:
            raise SimError(400, "0x80040203", "The Targets parameter is required and must be a non-empty list.")
        if any(not isinstance(t, dict) or "@odata.type" not in t for t in targets):
            raise SimError(400, "0x80048d19", _MISSING_TYPE)
        with self.store.transaction():  # standard tables: all or nothing
            if message == "CreateMultiple":
                ids = [self.store.create(caller, t)["contactid"] for t in targets]
                return Response.of_json(200, {
                    "@odata.context": f"{self.base}$metadata#Microsoft.Dynamics.CRM.CreateMultipleResponse",
                    "Ids": ids}, writes=len(ids))
            if message == "UpdateMultiple":
                seen: set[str] = set()
                for target in targets:
                    contact_id = str(target.get("contactid") or "").lower()
                    if not contact_id:
                        raise SimError(400, "0x80040203", "UpdateMultiple requires the primary key (contactid) "
                                                          "on every Target.")
                    if contact_id in seen:
                        continue  # only the first record with a given key is applied
                    seen.add(contact_id)
                    self.store.update(caller, contact_id, target)
                return Response(204, {"OData-Version": "4.0"}, writes=len(seen))
            return self._upsert_multiple(caller, targets)

    def _upsert_multiple(self, caller: Caller, targets: list[dict[str, Any]]) -> Response:
        identities: set[str] = set()
        for target in targets:
            ref = target.get("@odata.id")
            if ref:
                segments = split_segments(urlsplit(str(ref)).path.split(API_PREFIX)[-1].strip("/"))
                if len(segments) != 1 or segments[0][0] != "contacts" or segments[0][1] is None:
                    raise SimError(400, "0x80060888", f"Invalid @odata.id '{ref}'.")
                contact_id, row, alt = self._locate(segments[0][1])
            elif target.get("contactid"):
                contact_id, alt = str(target["contactid"]).lower(), None
                row = self.store.contacts.get(contact_id)
            else:
                raise SimError(400, "0x80040203", "UpsertMultiple requires @odata.id or the primary key on every "
                                                  "Target.")
            identity = json.dumps(alt, sort_keys=True).casefold() if alt else contact_id
            if identity in identities:
                # Documented as an error; the exact text is not.
                raise SimError(400, "0x80040203", "UpsertMultiple: Targets contain duplicate records with the "
                                                  f"same key ({identity}).")
            identities.add(identity)
            fields = {k: v for k, v in target.items() if k != "@odata.id"}
            if row is not None:
                if alt:
                    fields = {k: v for k, v in fields.items() if k not in alt}
                self.store.update(caller, row["contactid"], fields)
            else:
                if alt and any(k in fields for k in alt):
                    raise SimError(400, "0x80040216", "An unexpected error occurred.")
                self.store.create(caller, fields, contact_id=contact_id or None, key=alt)
        return Response(204, {"OData-Version": "4.0"}, writes=len(targets))

    # -- $batch ---------------------------------------------------------------------------------

    def _batch(self, caller: Caller, req: Request) -> Response:
        items = multipart.parse_batch(req.body, req.headers.get("content-type", ""))
        count = sum(len(i.requests) if isinstance(i, multipart.ChangeSet) else 1 for i in items)
        if count > self.config.max_batch_requests:
            raise SimError(400, "0x80060888", f"The number of requests in the batch ({count}) exceeds the limit of "
                                              f"{self.config.max_batch_requests}.")
        keep_going = "odata.continue-on-error" in req.prefers()
        out: list[multipart.InnerResponse | list[multipart.InnerResponse]] = []
        writes = reads = 0
        failed: multipart.InnerResponse | None = None
        for item in items:
            if isinstance(item, multipart.ChangeSet):
                result, failure, done = self._changeset(caller, item)
                writes += done
            else:
                resp = self._inner(caller, item, {})
                result = multipart.InnerResponse(resp.status, resp.headers, resp.body, item.content_id)
                failure = result if resp.status >= 400 else None
                writes, reads = writes + resp.writes, reads + resp.reads
            out.append(result if failure is None else failure)
            if failure is not None and not keep_going:
                failed = failure
                break
        if failed is not None:
            content_type, body = multipart.render_batch([failed])
            return Response(failed.status, {"Content-Type": content_type, "OData-Version": "4.0"}, body,
                            writes=writes, reads=reads, inner_requests=count)
        content_type, body = multipart.render_batch(out)
        return Response(200, {"Content-Type": content_type, "OData-Version": "4.0"}, body,
                        writes=writes, reads=reads, inner_requests=count)

    def _changeset(self, caller: Caller, changeset: multipart.ChangeSet
                   ) -> tuple[list[multipart.InnerResponse], multipart.InnerResponse | None, int]:
        """Runs atomically: any failure rolls back the whole change set and is its only response."""
        results: list[multipart.InnerResponse] = []
        writes = 0
        references: dict[str, str] = {}

        class _Rollback(Exception):
            pass

        failure: multipart.InnerResponse | None = None
        try:
            with self.store.transaction():
                for inner in changeset.requests:
                    if inner.method == "GET":
                        resp = Response.of_error(SimError(400, "0x80060888", "GET requests are not allowed inside "
                                                                             "a change set."))
                    else:
                        resp = self._inner(caller, inner, references)
                    result = multipart.InnerResponse(resp.status, resp.headers, resp.body, inner.content_id)
                    if resp.status >= 400:
                        failure = result
                        raise _Rollback
                    writes += resp.writes
                    if inner.content_id and "OData-EntityId" in resp.headers:
                        references[inner.content_id] = resp.headers["OData-EntityId"]
                    results.append(result)
        except _Rollback:
            return [], failure, 0
        return results, None, writes

    def _inner(self, caller: Caller, inner: multipart.InnerRequest, references: dict[str, str]) -> Response:
        url = inner.url
        if url.startswith("$"):
            ref, _, tail = url[1:].partition("/")
            if ref not in references:
                return Response.of_error(SimError(400, "0x80060888", f"Content-ID Reference: '${ref}' does not exist "
                                                                     "in the batch context."))
            url = references[ref] + ("/" + tail if tail else "")
        path = urlsplit(url).path
        if API_PREFIX not in path and not url.startswith(("/", "http")):
            target = url  # relative to the service root
        else:
            split = urlsplit(url)
            target = split.path.split(API_PREFIX, 1)[-1] + (f"?{split.query}" if split.query else "")
        body = inner.body
        if references and body:
            text = body.decode()
            for ref, entity in references.items():
                text = text.replace(f'"${ref}"', json.dumps(entity.split(API_PREFIX, 1)[-1]))
            body = text.encode()
        return self.handle(caller, Request(inner.method, target, inner.headers, body))
