"""The simulator's tables (contacts, systemusers, teams), their validation and their transactions.

Rows are plain dicts that are replaced, never mutated, on every write; a journal of the replaced rows
lets a change set or a bulk request roll back (checklist 16, 17). Every public method runs under the
store's lock, so the HTTP threads see one consistent table.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from devstack.dataverse.clock import Clock, Ids
from devstack.dataverse.errors import SimError, not_found, privilege_denied
from devstack.dataverse.odata import GUID_RE

# Writable string columns and their MaxLength (research/dataverse.md §2, checklist 9).
CONTACT_STRINGS = {
    "firstname": 50,
    "lastname": 50,
    "emailaddress1": 100,
    "mobilephone": 50,
    "company": 50,
    "jobtitle": 100,
    "websiteurl": 200,
    "description": 2000,
    "externaluseridentifier": 50,
    "telephone1": 50,
}
CONTACT_READONLY = (
    "contactid", "fullname", "statecode", "statuscode", "versionnumber", "createdon", "modifiedon",
    "_ownerid_value", "_owninguser_value", "_owningteam_value", "_createdby_value", "_modifiedby_value",
    "_createdonbehalfby_value", "_modifiedonbehalfby_value",
)
EXTERNAL_ID = "externaluseridentifier"
CONTACT_COLUMNS = frozenset(CONTACT_STRINGS) | frozenset(CONTACT_READONLY)
USER_COLUMNS = frozenset({
    "systemuserid", "fullname", "internalemailaddress", "isdisabled", "accessmode",
    "azureactivedirectoryobjectid", "_businessunitid_value", "domainname",
})
TEAM_COLUMNS = frozenset({"teamid", "name", "_businessunitid_value"})
VALID_STATUS = {0: {1}, 1: {2}}  # statecode -> allowed statuscodes (first is the default)
DEFAULT_STATUS = {0: 1, 1: 2}
STATE_NAMES = {0: "Active", 1: "Inactive"}

ADMIN_PRIVILEGES = frozenset({
    "prvCreateContact", "prvReadContact", "prvWriteContact", "prvDeleteContact", "prvAssignContact",
    "prvShareContact", "prvAppendContact", "prvAppendToContact", "prvReadUser", "prvReadTeam",
    "prvActOnBehalfOfAnotherUser",
})

# "/systemusers(<id>)", "systemusers(<id>)" or the absolute "https://org/api/data/v9.2/systemusers(<id>)"
_BIND_RE = re.compile(r"^(?:https?://[^/]+/api/data/v9\.\d/|/)?(systemusers|teams)\(([^)]*)\)$")
_UNKNOWN_PROPERTY = (
    "The property '{name}' does not exist on type 'Microsoft.Dynamics.CRM.contact'. Make sure to only use "
    "property names that are defined by the type or mark the type as open type."
)


@dataclass
class AltKey:
    name: str
    columns: tuple[str, ...]
    status: str = "Active"  # EntityKeyIndexStatus: Pending, InProgress, Active, Failed


@dataclass
class Caller:
    """Who a request runs as: `user` (effective, after impersonation) and the real caller if impersonating."""

    user: dict[str, Any]
    on_behalf_of: dict[str, Any] | None = None
    duplicate_detection: bool = False

    @property
    def actor_id(self) -> str:
        return (self.on_behalf_of or self.user)["systemuserid"]

    def require(self, privilege: str, entity: str = "contact") -> None:
        for user in filter(None, (self.user, self.on_behalf_of)):
            if privilege not in user["privileges"]:
                raise privilege_denied(user["systemuserid"], privilege, entity)


@dataclass
class StoreConfig:
    unknown_property_message: str = _UNKNOWN_PROPERTY
    # Updating other columns of an inactive contact (checklist 21): the exact error is not documented.
    reject_inactive_updates: bool = True
    inactive_update_error: tuple[int, str, str] = (
        400, "0x80040203", "The contact is inactive. Inactive records are read-only; reactivate it to edit it.")
    duplicate_rule_columns: tuple[str, ...] = ()  # checklist 20; e.g. ("emailaddress1",)


def utf16_len(text: str) -> int:
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


def etag(row: dict[str, Any]) -> str:
    return f'W/"{row["versionnumber"]}"'


@dataclass
class Store:
    clock: Clock
    ids: Ids
    config: StoreConfig = field(default_factory=StoreConfig)
    business_unit_id: str = ""
    organization_id: str = ""

    def __post_init__(self) -> None:
        self.lock = threading.RLock()
        self.contacts: dict[str, dict[str, Any]] = {}
        self.users: dict[str, dict[str, Any]] = {}
        self.teams: dict[str, dict[str, Any]] = {}
        self.keys: list[AltKey] = []
        self._version = 1000
        self._journal: list[tuple[str, dict[str, Any] | None]] = []
        self._depth = 0
        # externaluseridentifier (case-folded) -> contactids: lookups and key checks stay O(1) at 100k rows
        self._by_external: dict[str, set[str]] = {}
        self.business_unit_id = self.business_unit_id or self.ids.new()
        self.organization_id = self.organization_id or self.ids.new()

    # -- transactions -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """All writes inside either land together or, on any exception, are undone."""
        with self.lock:
            mark = len(self._journal)
            self._depth += 1
            try:
                yield
            except BaseException:
                while len(self._journal) > mark:
                    contact_id, old = self._journal.pop()
                    self._set(contact_id, old)
                raise
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._journal.clear()

    def _put(self, contact_id: str, row: dict[str, Any] | None) -> None:
        old = self.contacts.get(contact_id)
        if self._depth:
            self._journal.append((contact_id, old))
        self._set(contact_id, row)

    def _set(self, contact_id: str, row: dict[str, Any] | None) -> None:
        old = self.contacts.get(contact_id)
        if old is not None and old.get(EXTERNAL_ID):
            self._by_external.get(old[EXTERNAL_ID].casefold(), set()).discard(contact_id)
        if row is None:
            self.contacts.pop(contact_id, None)
            return
        self.contacts[contact_id] = row
        if row.get(EXTERNAL_ID):
            self._by_external.setdefault(row[EXTERNAL_ID].casefold(), set()).add(contact_id)

    def with_external_ids(self, folded: Iterable[str]) -> list[dict[str, Any]]:
        """Rows whose externaluseridentifier, case-folded, is one of `folded` (index lookup)."""
        ids = set().union(*(self._by_external.get(v, set()) for v in folded))
        return [self.contacts[i] for i in ids]

    def clear_contacts(self) -> None:
        with self.lock:
            self.contacts.clear()
            self._by_external.clear()

    # -- users and teams -------------------------------------------------------------------------

    def add_user(
        self,
        email: str,
        *,
        enabled: bool = True,
        accessmode: int = 0,
        privileges: set[str] | frozenset[str] | None = None,
        oid: str | None = None,
        fullname: str | None = None,
        systemuserid: str | None = None,
    ) -> dict[str, Any]:
        with self.lock:
            user_id = (systemuserid or self.ids.new()).lower()
            user = {
                "systemuserid": user_id,
                "fullname": fullname or email.split("@")[0],
                "internalemailaddress": email,
                "domainname": email,
                "isdisabled": not enabled,
                "accessmode": accessmode,
                "azureactivedirectoryobjectid": (oid or self.ids.new()).lower(),
                "_businessunitid_value": self.business_unit_id,
                "privileges": {p: "Global" for p in (ADMIN_PRIVILEGES if privileges is None else privileges)},
            }
            self.users[user_id] = user
            return user

    def user_by_oid(self, oid: str) -> dict[str, Any] | None:
        with self.lock:
            return next((u for u in self.users.values() if u["azureactivedirectoryobjectid"] == oid.lower()), None)

    def add_team(self, name: str) -> dict[str, Any]:
        with self.lock:
            team = {"teamid": self.ids.new(), "name": name, "_businessunitid_value": self.business_unit_id}
            self.teams[team["teamid"]] = team
            return team

    # -- keys -------------------------------------------------------------------------------------

    def active_key(self, columns: set[str]) -> AltKey | None:
        return next((k for k in self.keys if set(k.columns) == columns and k.status == "Active"), None)

    def find_by_key(self, key: dict[str, Any]) -> dict[str, Any] | None:
        wanted = {name: str(value).casefold() for name, value in key.items()}
        rows = self.with_external_ids([wanted[EXTERNAL_ID]]) if EXTERNAL_ID in wanted else self.contacts.values()
        for row in rows:
            if all(isinstance(row.get(n), str) and row[n].casefold() == v for n, v in wanted.items()):
                return row
        return None

    # -- validation -------------------------------------------------------------------------------

    def _validate(self, body: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        """Body -> (column changes, owner bind target or None). Raises the documented errors."""
        changes: dict[str, Any] = {}
        owner: str | None = None
        for name, value in body.items():
            if name in ("@odata.type", "@odata.id", "contactid"):
                if name == "@odata.type" and value != "Microsoft.Dynamics.CRM.contact":
                    raise SimError(400, "0x80048d19", f"Invalid @odata.type '{value}' for entity set 'contacts'.")
                continue
            if name == "ownerid@odata.bind":
                owner = self._owner_target(value)
                continue
            if name in ("statecode", "statuscode"):
                if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                    raise SimError(400, "0x80048d19", f"Cannot convert the literal '{value}' to 'Edm.Int32'.")
                changes[name] = value
                continue
            if name not in CONTACT_STRINGS:
                raise SimError(400, "0x80060888", self.config.unknown_property_message.format(name=name))
            if value is not None and not isinstance(value, str):
                raise SimError(
                    400, "0x80048d19",
                    f"Cannot convert the literal '{value}' to the expected type 'Edm.String'.")
            limit = CONTACT_STRINGS[name]
            if isinstance(value, str) and utf16_len(value) > limit:
                raise SimError(
                    400, "0x80044331",
                    f"A validation error occurred.  The length of the '{name}' attribute of the 'contact' "
                    f"entity exceeded the maximum allowed length of '{limit}'.")
            changes[name] = value if value != "" else None
        return changes, owner

    def _owner_target(self, value: Any) -> str:
        match = _BIND_RE.match(value) if isinstance(value, str) else None
        if not match or not GUID_RE.fullmatch(match.group(2)):
            raise SimError(400, "0x80060888", f"Invalid value '{value}' for 'ownerid@odata.bind'.")
        entity_set, owner_id = match.group(1), match.group(2).lower()
        if entity_set == "teams":
            if owner_id not in self.teams:
                raise not_found("team", owner_id)
            return owner_id
        user = self.users.get(owner_id)
        if user is None:
            raise not_found("systemuser", owner_id)
        if user["isdisabled"]:
            # Not documented word for word; a disabled user cannot own records.
            raise SimError(400, "0x80040225", f"The specified user(Id = {owner_id}) is disabled. "
                                              "Consider enabling this user.")
        return owner_id

    def _apply_state(self, row: dict[str, Any], changes: dict[str, Any]) -> None:
        state = changes.pop("statecode", None)
        status = changes.pop("statuscode", None)
        if state is None and status is None:
            return
        new_state = row["statecode"] if state is None else state
        if new_state not in VALID_STATUS:
            raise SimError(400, "0x80040203", f"{new_state} is not a valid state code on contact.")
        new_status = DEFAULT_STATUS[new_state] if status is None else status
        if new_status not in VALID_STATUS[new_state]:
            raise SimError(
                400, "0x80040203",
                f"{new_status} is not a valid status code for state code ContactState.{STATE_NAMES[new_state]} "
                f"on contact with Id {row['contactid']}.")
        row["statecode"], row["statuscode"] = new_state, new_status

    def _check_unique(self, row: dict[str, Any], caller: Caller) -> None:
        for key in self.keys:
            if key.status != "Active":
                continue
            values = [row.get(c) for c in key.columns]
            if any(v is None for v in values):
                continue
            folded = [str(v).casefold() for v in values]
            candidates = (self.with_external_ids([row[EXTERNAL_ID].casefold()]) if EXTERNAL_ID in key.columns
                          else self.contacts.values())
            for other in candidates:
                if other["contactid"] != row["contactid"] and [
                    str(other.get(c) or "").casefold() for c in key.columns
                ] == folded:
                    raise SimError(
                        412, "0x80060892",
                        f"Entity Key {key.name} violated. A record with the same value for "
                        f"{', '.join(key.columns)} already exists. A duplicate record cannot be created. "
                        "Try again with a different value.")
        if caller.duplicate_detection:
            for column in self.config.duplicate_rule_columns:
                value = row.get(column)
                if value and any(
                    o["contactid"] != row["contactid"] and o["statecode"] == 0
                    and str(o.get(column) or "").casefold() == str(value).casefold()
                    for o in self.contacts.values()
                ):
                    raise SimError(
                        500, "0x80040333",
                        "A record was not created or updated because a duplicate of the current record "
                        "already exists.")

    # -- contact writes ---------------------------------------------------------------------------

    def _next_version(self) -> int:
        self._version += 1
        return self._version

    def create(self, caller: Caller, body: dict[str, Any], contact_id: str | None = None,
               key: dict[str, Any] | None = None) -> dict[str, Any]:
        with self.lock:
            caller.require("prvCreateContact")
            changes, owner = self._validate(body)
            contact_id = (contact_id or body.get("contactid") or self.ids.new()).lower()
            if not GUID_RE.fullmatch(contact_id):
                raise SimError(400, "0x80040203", f"Invalid contactid '{contact_id}'.")
            if contact_id in self.contacts:
                raise SimError(412, "0x80040237", "A record with matching key values already exists.")
            if owner and owner != caller.user["systemuserid"]:
                caller.require("prvAssignContact")
            now = self.clock.iso()
            row: dict[str, Any] = {column: None for column in CONTACT_STRINGS}
            row.update(
                contactid=contact_id, statecode=0, statuscode=1, createdon=now, modifiedon=now,
                _ownerid_value=owner or caller.user["systemuserid"],
                _createdby_value=caller.user["systemuserid"], _modifiedby_value=caller.user["systemuserid"],
                _createdonbehalfby_value=caller.on_behalf_of["systemuserid"] if caller.on_behalf_of else None,
                _modifiedonbehalfby_value=caller.on_behalf_of["systemuserid"] if caller.on_behalf_of else None,
            )
            row.update(changes)
            row.update(key or {})  # key values in the URL win over the body on create
            self._apply_state(row, changes)
            self._finish(row, caller)
            return row

    def update(self, caller: Caller, contact_id: str, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            current = self.contacts.get(contact_id)
            if current is None:
                raise not_found("contact", contact_id)
            caller.require("prvWriteContact")
            changes, owner = self._validate(body)
            row = dict(current)
            reactivating = changes.get("statecode") == 0
            self._apply_state(row, changes)
            if current["statecode"] == 1 and not reactivating and changes and self.config.reject_inactive_updates:
                status, code, message = self.config.inactive_update_error
                raise SimError(status, code, message)
            row.update(changes)
            if owner and owner != current["_ownerid_value"]:
                caller.require("prvAssignContact")
                row["_ownerid_value"] = owner
            row["modifiedon"] = self.clock.iso()
            row["_modifiedby_value"] = caller.user["systemuserid"]
            row["_modifiedonbehalfby_value"] = caller.on_behalf_of["systemuserid"] if caller.on_behalf_of else None
            self._finish(row, caller)
            return row

    def _finish(self, row: dict[str, Any], caller: Caller) -> None:
        row["fullname"] = " ".join(p for p in (row.get("firstname"), row.get("lastname")) if p) or None
        self._check_unique(row, caller)
        row["versionnumber"] = self._next_version()
        self._put(row["contactid"], row)

    def delete(self, caller: Caller, contact_id: str) -> None:
        with self.lock:
            if contact_id not in self.contacts:
                raise not_found("contact", contact_id)
            caller.require("prvDeleteContact")
            self._put(contact_id, None)

    def snapshot(self) -> dict[str, list[dict[str, Any]]]:
        with self.lock:
            users = [{k: v for k, v in u.items() if k != "privileges"} | {"privileges": sorted(u["privileges"])}
                     for u in self.users.values()]
            return {"contacts": [dict(r) for r in self.contacts.values()], "systemusers": users,
                    "teams": [dict(t) for t in self.teams.values()]}
