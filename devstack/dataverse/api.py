"""Web API semantics of the simulator: one request (already authenticated and admitted) -> one response.

Used for top-level requests and for each request inside a `$batch`. Entity sets: contacts, systemusers,
teams, sdkmessagefilters, EntityDefinitions(...)/Keys; functions: WhoAmI, RetrieveUserPrivileges. The bulk
actions and `$batch` are in bulk.py.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

from devstack.dataverse import bulk, metadata
from devstack.dataverse.errors import SimError, not_found, privilege_id
from devstack.dataverse.odata import GUID_RE, format_key, index_hint, parse_filter, parse_key, query_error
from devstack.dataverse.protocol import (
    API_PREFIX,
    Request,
    Response,
    SimConfig,
    segment_not_found,
    split_segments,
)
from devstack.dataverse.store import (
    CONTACT_COLUMNS,
    TEAM_COLUMNS,
    USER_COLUMNS,
    Caller,
    Store,
    etag,
)

_KEY_NOT_VALID = (
    "The key in the request URI is not valid for resource 'Microsoft.Dynamics.CRM.contact'. Ensure that the names "
    "and number of key properties match the declared or alternate key properties for the resource "
    "'Microsoft.Dynamics.CRM.contact'."
)
SDK_MESSAGE_COLUMNS = frozenset({"sdkmessagefilterid", "primaryobjecttypecode", "sdkmessageid/name", "sdkmessageid"})


class WebApi:
    def __init__(self, store: Store, config: SimConfig, origin: Callable[[], str],
                 part_fault: Callable[[str, str], SimError | None] = lambda method, url: None) -> None:
        self.store = store
        self.config = config
        self.origin = origin
        self.part_fault = part_fault  # an injected error for a request inside a $batch (faults.py `in_batch`)

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
            raise segment_not_found("")
        (name, key), rest = segments[0], segments[1:]
        m = req.method
        if name in ("WhoAmI", "WhoAmI()") and not rest and m == "GET":
            return self._whoami(caller)
        if name == "$batch" and m == "POST":
            return bulk.batch(self, caller, req)
        if name == "contacts":
            if key is None and not rest:
                if m == "GET":
                    return self._query(caller, req, "contacts")
                if m == "POST":
                    return self._create(caller, req)
                raise SimError(405, "0x80060888",
                               f"The HTTP method '{m}' is not allowed for the collection 'contacts'.")
            if key is None and rest == [("$count", None)] and m == "GET":
                return self._count(caller, req)
            if key is None and len(rest) == 1 and m == "POST":
                return bulk.bulk_action(self, caller, req, rest[0][0])
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
        if name == "EntityDefinitions" and m == "GET":
            return Response.of_json(200, metadata.handle(key, rest, req.query, self.base))
        raise segment_not_found(name if not rest else rest[-1][0])

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
        raise segment_not_found(rest[-1][0])

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
        predicate = (parse_filter(q["$filter"], check, self.config.odata_lexer) if q.get("$filter")
                     else (lambda row: True))
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

    def _count(self, caller: Caller, req: Request) -> Response:
        """GET contacts/$count[?$filter=...]: the number as text/plain, at most 5,000 like $count=true.

        https://learn.microsoft.com/power-apps/developer/data-platform/webapi/query/count-rows
        """
        caller.require("prvReadContact")
        unsupported = {k for k in req.query if k.startswith("$")} - {"$filter"}
        if unsupported:
            raise query_error(f"The query option '{sorted(unsupported)[0]}' is not supported with $count.")
        check = self._check_property("contacts")
        predicate = (parse_filter(req.query["$filter"], check, self.config.odata_lexer) if req.query.get("$filter")
                     else (lambda row: True))
        with self.store.lock:
            total = sum(1 for row in self.store.contacts.values() if predicate(row))
        return Response(200, {"Content-Type": "text/plain; charset=utf-8", "OData-Version": "4.0"},
                        str(min(total, 5000)).encode(), reads=1)

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

    def locate(self, key: str) -> tuple[str, dict[str, Any] | None, dict[str, Any] | None]:
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
            contact_id, row, alt = self.locate(key)
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
            contact_id, row, alt = self.locate(key)
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
            contact_id, row, alt = self.locate(key)
            if row is None:
                raise self._missing(contact_id, alt)
            self._check_preconditions(req, row, contact_id, alt)
            self.store.delete(caller, row["contactid"])
            return Response(204, {"OData-Version": "4.0"}, writes=1)
