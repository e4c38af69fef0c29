"""Table definitions (EntityDefinitions) for the tables the simulator has: the metadata reads that clients
make before their first write.

Microsoft's Python SDK (PyPI PowerPlatform-Dataverse-Client, PowerPlatform/Dataverse/data/_odata.py) resolves
a table's entity set with `EntityDefinitions?$select=LogicalName,EntitySetName,PrimaryIdAttribute&$filter=
LogicalName eq 'contact'` and reads its choice columns with `EntityDefinitions(LogicalName='contact')/Attributes/
Microsoft.Dynamics.CRM.PicklistAttributeMetadata?$select=LogicalName&$expand=OptionSet($select=Options)`
(https://learn.microsoft.com/power-apps/developer/data-platform/webapi/query-metadata-web-api).
Only the columns the simulator's tables have are described: contact has no choice column here (statecode
and statuscode are State/Status attributes, not Picklist ones); systemuser has accessmode.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

from devstack.dataverse.errors import SimError
from devstack.dataverse.odata import parse_filter, parse_key, query_error
from devstack.dataverse.store import CONTACT_COLUMNS, TEAM_COLUMNS, USER_COLUMNS

ENTITY_PROPERTIES = ("MetadataId", "LogicalName", "SchemaName", "EntitySetName", "LogicalCollectionName",
                     "PrimaryIdAttribute", "PrimaryNameAttribute", "ObjectTypeCode", "IsCustomEntity")
ATTRIBUTE_PROPERTIES = ("MetadataId", "LogicalName", "SchemaName", "AttributeType", "AttributeTypeName",
                        "EntityLogicalName")
PICKLIST = "Microsoft.Dynamics.CRM.PicklistAttributeMetadata"


@dataclass(frozen=True)
class Choice:
    column: str
    options: tuple[tuple[int, str], ...]  # (Value, English label)


@dataclass(frozen=True)
class Table:
    logical: str
    schema: str
    entity_set: str
    primary_id: str
    primary_name: str
    type_code: int
    columns: frozenset[str]
    choices: tuple[Choice, ...] = ()


# ObjectTypeCode 2 (contact) and 8 (systemuser) as in devstack/dataverse/errors.py's messages, 9 (team) from
# https://learn.microsoft.com/power-apps/developer/data-platform/reference/entities/team; accessmode's options from
# https://learn.microsoft.com/power-apps/developer/data-platform/reference/entities/systemuser#BKMK_AccessMode
TABLES = {t.logical: t for t in (
    Table("contact", "Contact", "contacts", "contactid", "fullname", 2, CONTACT_COLUMNS),
    Table("systemuser", "SystemUser", "systemusers", "systemuserid", "fullname", 8, USER_COLUMNS,
          (Choice("accessmode", ((0, "Read-Write"), (1, "Administrative"), (2, "Read"), (3, "Support User"),
                                 (4, "Non-interactive"), (5, "Delegated Admin"))),)),
    Table("team", "Team", "teams", "teamid", "name", 9, TEAM_COLUMNS),
)}


def _id(*parts: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_OID, "/".join(("metadata", *parts))))


def entity(table: Table) -> dict[str, Any]:
    return {"MetadataId": _id(table.logical), "LogicalName": table.logical, "SchemaName": table.schema,
            "EntitySetName": table.entity_set, "LogicalCollectionName": table.entity_set,
            "PrimaryIdAttribute": table.primary_id, "PrimaryNameAttribute": table.primary_name,
            "ObjectTypeCode": table.type_code, "IsCustomEntity": False}


def _label(text: str) -> dict[str, Any]:
    localized = {"Label": text, "LanguageCode": 1033, "IsManaged": True, "MetadataId": _id("label", text),
                 "HasChanged": None}
    return {"LocalizedLabels": [localized], "UserLocalizedLabel": localized}


def _attributes(table: Table, picklists_only: bool) -> list[dict[str, Any]]:
    choices = {c.column: c for c in table.choices}
    rows = []
    for column in sorted(table.columns):
        if "/" in column or column.startswith("_") or (picklists_only and column not in choices):
            continue
        kind = "Picklist" if column in choices else "String"
        row: dict[str, Any] = {
            "@odata.type": f"#Microsoft.Dynamics.CRM.{kind}AttributeMetadata", "MetadataId": _id(table.logical, column),
            "LogicalName": column, "SchemaName": column, "AttributeType": kind,
            "AttributeTypeName": {"Value": f"{kind}Type"}, "EntityLogicalName": table.logical,
        }
        if column in choices:
            row["OptionSet"] = {
                "MetadataId": _id(table.logical, column, "optionset"), "Name": f"{table.logical}_{column}",
                "OptionSetType": "Picklist",
                "Options": [{"Value": value, "Label": _label(text)} for value, text in choices[column].options],
            }
        rows.append(row)
    return rows


def _select(raw: str, allowed: tuple[str, ...], type_name: str) -> list[str] | None:
    names = [s.strip() for s in raw.split(",") if s.strip()]
    for name in names:
        if name not in allowed:
            raise query_error(f"Could not find a property named '{name}' on type 'Microsoft.Dynamics.CRM.{type_name}'.")
    return names or None


def _project(row: dict[str, Any], select: list[str] | None, keep: tuple[str, ...] = ()) -> dict[str, Any]:
    if select is None:
        return {k: v for k, v in row.items() if k != "OptionSet" or "OptionSet" in keep}
    return {k: v for k, v in row.items() if k in select or k in ("MetadataId", "@odata.type", *keep)}


def _expand_option_set(raw: str) -> tuple[bool, list[str] | None]:
    """($expand names OptionSet, its nested $select)."""
    if not raw:
        return False, None
    match = re.fullmatch(r"\s*OptionSet\s*(?:\(\s*\$select\s*=\s*([A-Za-z,\s]+)\))?\s*", raw)
    if not match:
        raise query_error(f"The $expand '{raw}' is not supported for attribute metadata.")
    return True, [s.strip() for s in (match.group(1) or "").split(",") if s.strip()] or None


def _table(key: str) -> Table:
    parsed = parse_key(key)
    if "" in parsed:
        found = next((t for t in TABLES.values() if _id(t.logical) == parsed[""]), None)
        name = parsed[""]
    else:
        name = str(parsed.get("LogicalName", ""))
        found = TABLES.get(name) if list(parsed) == ["LogicalName"] else None
    if found is None:
        raise SimError(404, "0x80040217", f"Could not find an entity with name {name}.")
    return found


def handle(key: str | None, rest: list[tuple[str, str | None]], query: dict[str, str],
           base: str) -> dict[str, Any]:
    """GET EntityDefinitions[...] but .../Keys (api.py answers those): the JSON body of the 200."""
    unsupported = {k for k in query if k.startswith("$")} - {"$select", "$filter", "$expand"}
    if unsupported:
        raise query_error(f"The query option '{sorted(unsupported)[0]}' is not supported on metadata.")
    if key is None and not rest:
        select = _select(query.get("$select", ""), ENTITY_PROPERTIES, "EntityMetadata")

        def check(name: str) -> None:
            if name not in ENTITY_PROPERTIES:
                raise query_error(f"Could not find a property named '{name}' on type "
                                  "'Microsoft.Dynamics.CRM.EntityMetadata'.")

        predicate = parse_filter(query["$filter"], check) if query.get("$filter") else (lambda row: True)
        rows = [_project(r, select) for r in map(entity, TABLES.values()) if predicate(r)]
        context = "EntityDefinitions" + (f"({','.join(select)})" if select else "")
        return {"@odata.context": f"{base}$metadata#{context}", "value": rows}
    if key is None:
        raise SimError(404, "0x8006088a", f"Resource not found for the segment '{rest[0][0]}'.")
    table = _table(key)
    if not rest:
        select = _select(query.get("$select", ""), ENTITY_PROPERTIES, "EntityMetadata")
        return {"@odata.context": f"{base}$metadata#EntityDefinitions/$entity", **_project(entity(table), select)}
    if rest[0] == ("Attributes", None) and len(rest) <= 2:
        cast = rest[1][0] if len(rest) == 2 else None
        if cast not in (None, PICKLIST) or (len(rest) == 2 and rest[1][1] is not None):
            raise SimError(404, "0x8006088a", f"Resource not found for the segment '{rest[-1][0]}'.")
        expand, nested = _expand_option_set(query.get("$expand", ""))
        if expand and cast is None:
            raise query_error("Could not find a property named 'OptionSet' on type "
                              "'Microsoft.Dynamics.CRM.AttributeMetadata'.")
        select = _select(query.get("$select", ""), ATTRIBUTE_PROPERTIES, "AttributeMetadata")
        rows = []
        for row in _attributes(table, picklists_only=cast == PICKLIST):
            out = _project(row, select, ("OptionSet",) if expand else ())
            if expand and nested:
                out["OptionSet"] = {k: v for k, v in row["OptionSet"].items() if k in (*nested, "MetadataId")}
            rows.append(out)
        suffix = f"/{PICKLIST}" if cast else ""
        return {"@odata.context": f"{base}$metadata#EntityDefinitions('{table.logical}')/Attributes{suffix}",
                     "value": rows}
    raise SimError(404, "0x8006088a", f"Resource not found for the segment '{rest[-1][0]}'.")

