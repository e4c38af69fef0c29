"""Table Storage helpers every store shares: reads by key, one ETag-conditional read-modify-write,
entity-group transactions, and the webhook's two single-row calls (`insert_row`, `row_exists`).

The transaction shortcut is fenced here. `submit_changeset` builds the `$batch` body as plain text and
sends it through the SDK's private `TableClient._client.send_request`, because `submit_transaction`
builds it with the email package and runs its policies per part (about 1 ms of CPU per entity, which made
writing a backfill page's states cost more than everything else on the page). That private shape is
checked once (`fast_path_available`) against what the pinned azure-data-tables (requirements.txt) has;
without it every transaction goes through the SDK's own `submit_transaction` instead, slower but right,
and tests/test_table_transactions.py fails, so that an SDK upgrade is noticed rather than silently slow.
Wire format: https://learn.microsoft.com/rest/api/storageservices/performing-entity-group-transactions

`insert_row` and `row_exists` go the same way: every accepted webhook makes these two calls, and the SDK's
`create_entity` / `get_entity` spent more CPU serializing, deserializing and raising (a 409 is an exception
there) than the HTTP call itself (profiled with cProfile over 2,000 webhooks: app CPU per webhook 2.57 ->
1.95 ms). Wire format: https://learn.microsoft.com/rest/api/storageservices/insert-entity and
https://learn.microsoft.com/rest/api/storageservices/query-entities (one entity by its keys).
"""

from __future__ import annotations

import base64
import inspect
import json
import logging
import random
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar
from urllib.parse import quote

from azure.core import MatchConditions
from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.core.rest import HttpRequest
from azure.data.tables import (
    EdmType,
    EntityProperty,
    TableClient,
    TableEntity,
    TableTransactionError,
    UpdateMode,
)

from core.errors import ConcurrencyError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
TRANSACTION_SIZE = 100  # operations per entity-group transaction, the service's limit
# Table Storage allows at most 15 comparisons in one filter.
_FILTER_KEYS = 14

# A page's Table requests run side by side: each mostly waits on the storage service, so a few threads
# overlap them.
_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="tables")


def side_by_side(fn: Callable[[T], R], items: list[T]) -> list[R]:
    """fn over items, on the tables' thread pool when there is more than one."""
    return [fn(i) for i in items] if len(items) <= 1 else list(_POOL.map(fn, items))


def transaction_chunks(groups: Iterable[list[T]]) -> list[list[T]]:
    """Each partition's rows in chunks a transaction takes (one partition, at most TRANSACTION_SIZE)."""
    return [group[start:start + TRANSACTION_SIZE] for group in groups
            for start in range(0, len(group), TRANSACTION_SIZE)]


def etag_of(entity: object) -> str | None:
    metadata = getattr(entity, "metadata", None)
    return metadata.get("etag") if isinstance(metadata, dict) else None


# -- reads by key ---------------------------------------------------------------------------------

Query = tuple[str, dict[str, str]]  # a filter and its parameters


def _rowkey_queries(partition: str, keys: list[str]) -> list[Query]:
    """OR-ed RowKeys, a few per query (Table Storage answers these by scanning the partition)."""
    queries = []
    for start in range(0, len(keys), _FILTER_KEYS):
        chunk = keys[start:start + _FILTER_KEYS]
        params = {f"k{i}": k for i, k in enumerate(chunk)}
        clause = " or ".join(f"RowKey eq @k{i}" for i in range(len(chunk)))
        # (the SDK reads a parameter name up to the next space, so none may touch the parenthesis)
        queries.append((f"PartitionKey eq @pk and ( {clause} )", {"pk": partition, **params}))
    return queries


def _range_query(partition: str, keys: list[str]) -> Query:
    """Everything from the smallest key to the largest: only for keys that are (nearly) adjacent in
    RowKey order, such as one page of a listing sorted by id, or scattered keys would read the partition."""
    return ("PartitionKey eq @pk and RowKey ge @lo and RowKey le @hi",
            {"pk": partition, "lo": min(keys), "hi": max(keys)})


def query_keys(table: TableClient, keys_by_partition: Mapping[str, Iterable[str]], *, adjacent: bool = False,
               select: list[str] | None = None) -> dict[str, TableEntity]:
    """Entities by RowKey, from one or more partitions, the queries side by side.

    `adjacent`: each partition's keys are neighbours in RowKey order, so one range query per partition
    reads them (an OR of many RowKeys would make Table Storage scan the partition)."""
    wanted: set[str] = set()
    queries: list[Query] = []
    for partition, keys in keys_by_partition.items():
        ordered = sorted(set(keys))
        if not ordered:
            continue
        wanted.update(ordered)
        queries += [_range_query(partition, ordered)] if adjacent else _rowkey_queries(partition, ordered)

    def one(query: Query) -> list[TableEntity]:
        return list(table.query_entities(query[0], parameters=query[1], select=select))

    return {entity["RowKey"]: entity for rows in side_by_side(one, queries) for entity in rows
            if entity["RowKey"] in wanted}


# -- one ETag-conditional read-modify-write ---------------------------------------------------------

def update_row(table: TableClient, partition: str, row: str,
               change: Callable[[TableEntity | None], dict[str, Any] | None], *, attempts: int = 20,
               what: str = "row") -> str | None:
    """Read the row (None when absent), let `change` say what it becomes (None: leave it as it is), and
    write that only if nobody changed the row since it was read: an insert that fails when the row
    appeared meanwhile, or a replace conditional on the ETag read. Read again and retry on a conflict;
    ConcurrencyError after `attempts`. Returns the written row's ETag, or None when `change` left it."""
    for attempt in range(attempts):
        try:
            old: TableEntity | None = table.get_entity(partition, row)
        except ResourceNotFoundError:
            old = None
        new = change(old)
        if new is None:
            return None
        try:
            if old is None:
                written = table.create_entity(new)
            else:
                written = table.update_entity(new, mode=UpdateMode.REPLACE, etag=etag_of(old),
                                              match_condition=MatchConditions.IfNotModified)
            return str(written.get("etag") or "")
        except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
            time.sleep(random.uniform(0, 0.01 * (attempt + 1)))  # back off a little before reading again
    raise ConcurrencyError(f"{what} {partition}/{row} kept changing; gave up after {attempts} attempts")


# -- entity-group transactions ---------------------------------------------------------------------

class ChangesetFailed(Exception):
    """A transaction was refused as a whole (one of its rows conflicted, or the service said no)."""


# (op, entity, etag): "create" fails if the row exists; "replace" needs the row (If-Match: the etag, or any
# with None); "upsert" inserts or replaces; "delete" needs the row (If-Match as for replace). An upsert or a
# delete needs only the entity's keys.
Operation = tuple[Literal["create", "replace", "upsert", "delete"], dict[str, Any], str | None]


def fast_path_available(table: TableClient) -> bool:
    """True when the client has the private pieces `submit_changeset` sends through, as the pinned SDK
    has them: `_client.send_request(request, *, stream=...)`, `url`, `table_name` and `api_version`."""
    client = getattr(table, "_client", None)
    send = getattr(client, "send_request", None)
    if send is None or not all(isinstance(getattr(table, name, None), str)
                               for name in ("url", "table_name", "api_version")):
        return False
    try:
        params = inspect.signature(send).parameters
    except (TypeError, ValueError):
        return False
    return "request" in params and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _json_entity(entity: Mapping[str, Any]) -> str:
    """Strings, booleans, plain ints as Edm.Int32, `int64` properties as Edm.Int64 (a string with its
    type annotation) and bytes as Edm.Binary (base64), as the SDK writes them; a plain int beyond 32 bits
    is refused, as the SDK does."""
    out: dict[str, Any] = {}
    for name, value in entity.items():
        if isinstance(value, EntityProperty) and value.edm_type == EdmType.INT64:
            out[f"{name}@odata.type"], out[name] = "Edm.Int64", str(int(value.value))
            continue
        if isinstance(value, bytes):
            out[f"{name}@odata.type"], out[name] = "Edm.Binary", base64.b64encode(value).decode()
            continue
        if not isinstance(value, (str, bool, int)) or (
                isinstance(value, int) and not isinstance(value, bool) and not -2**31 <= value < 2**31):
            raise TypeError(f"{name}: {value!r} is not a string, bytes, a boolean, a 32-bit int or an int64()")
        out[name] = value
    return json.dumps(out, separators=(",", ":"), ensure_ascii=False)


def _key(value: str) -> str:
    return quote(value.replace("'", "''"), safe="")


def _send_plain(table: TableClient, ops: list[Operation]) -> None:
    base = table.url.split("?", 1)[0].rstrip("/")
    changeset, batch = f"changeset_{uuid.uuid4()}", f"batch_{uuid.uuid4()}"
    parts = [f"--{batch}\r\nContent-Type: multipart/mixed; boundary={changeset}\r\n\r\n"]
    for op, entity, etag in ops:
        keys = f"PartitionKey='{_key(entity['PartitionKey'])}',RowKey='{_key(entity['RowKey'])}'"
        row = f"{base}/{table.table_name}({keys})"
        if op == "create":
            line = f"POST {base}/{table.table_name} HTTP/1.1\r\n"
        elif op == "upsert":  # a PUT without If-Match inserts or replaces
            line = f"PUT {row} HTTP/1.1\r\n"
        elif op == "delete":
            parts.append(f"--{changeset}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
                         f"\r\nDELETE {row} HTTP/1.1\r\nIf-Match: {etag or '*'}\r\nAccept: application/json;"
                         "odata=minimalmetadata\r\nDataServiceVersion: 3.0\r\n\r\n")
            continue
        else:
            line = f"PUT {row} HTTP/1.1\r\nIf-Match: {etag or '*'}\r\n"
        parts.append(f"--{changeset}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
                     f"\r\n{line}Content-Type: application/json\r\nAccept: application/json;odata=minimalmetadata\r\n"
                     f"Prefer: return-no-content\r\nDataServiceVersion: 3.0\r\n\r\n{_json_entity(entity)}\r\n")
    parts.append(f"--{changeset}--\r\n--{batch}--\r\n")
    request = HttpRequest("POST", f"{base}/$batch", content="".join(parts).encode(), headers={
        "Content-Type": f"multipart/mixed; boundary={batch}", "Accept": "application/json",
        "DataServiceVersion": "3.0", "MaxDataServiceVersion": "3.0;NetFx", "x-ms-version": table.api_version})
    # the client's own pipeline (auth, retries); streamed, as the SDK does, so nothing decodes the multipart
    response = table._client.send_request(request, stream=True)
    if response.status_code != 202:
        raise ChangesetFailed(f"transaction answered {response.status_code}")
    statuses = [int(code) for code in re.findall(rb"^HTTP/1\.1 (\d{3})", response.read(), flags=re.M)]
    if len(statuses) != len(ops) or any(not 200 <= code < 300 for code in statuses):
        raise ChangesetFailed(f"transaction refused: {statuses[:3]}")


def _send_through_sdk(table: TableClient, ops: list[Operation]) -> None:
    operations: list[Any] = []
    for op, entity, etag in ops:
        if op == "create":
            operations.append(("create", entity))
        elif op == "upsert":
            operations.append(("upsert", entity, {"mode": UpdateMode.REPLACE}))
        elif op == "delete":
            condition = MatchConditions.IfNotModified if etag else MatchConditions.Unconditionally
            operations.append(("delete", entity, {"etag": etag, "match_condition": condition}))
        else:
            condition = MatchConditions.IfNotModified if etag else MatchConditions.Unconditionally
            operations.append(("update", entity, {"mode": UpdateMode.REPLACE, "etag": etag,
                                                  "match_condition": condition}))
    try:
        table.submit_transaction(operations)
    except TableTransactionError as exc:
        raise ChangesetFailed(f"transaction refused: {exc.status_code}") from None


_warned = False


def submit_changeset(table: TableClient, ops: list[Operation]) -> None:
    """One entity-group transaction of ("create" | "replace", entity, etag) operations on one partition.
    Raises ChangesetFailed when the service refuses it (nothing of it was applied)."""
    global _warned
    if fast_path_available(table):
        _send_plain(table, ops)
        return
    if not _warned:
        _warned = True
        log.warning("azure-data-tables lacks the private TableClient._client.send_request that core/tables.py "
                    "uses; transactions go through submit_transaction (slower)")
    _send_through_sdk(table, ops)


# -- the webhook's single-row calls -----------------------------------------------------------------

def _send_one(table: TableClient, method: str, path: str, body: bytes | None = None,
              headers: dict[str, str] | None = None) -> int:
    """One request through the client's own pipeline (auth, retries); returns the status."""
    base = table.url.split("?", 1)[0].rstrip("/")
    request = HttpRequest(method, f"{base}/{path}", content=body, headers={
        "Accept": "application/json;odata=nometadata", "DataServiceVersion": "3.0", "MaxDataServiceVersion":
        "3.0;NetFx", "x-ms-version": table.api_version, **(headers or {})})
    response = table._client.send_request(request)
    if response.status_code >= 400 and response.status_code not in (404, 409):
        raise HttpResponseError(message=f"{method} {table.table_name} answered {response.status_code}",
                                response=response)
    return response.status_code


def insert_row(table: TableClient, entity: Mapping[str, Any]) -> bool:
    """Insert the row; False when a row with its keys exists already (nothing is changed then). Properties
    as `_json_entity` takes them (what the SDK's `create_entity` writes for the same values)."""
    if not fast_path_available(table):
        try:
            table.create_entity(dict(entity))
        except ResourceExistsError:
            return False
        return True
    status = _send_one(table, "POST", table.table_name, _json_entity(entity).encode(), {
        "Content-Type": "application/json", "Prefer": "return-no-content"})
    if status == 409:
        return False
    if status == 404:  # the table is gone: as the SDK says it
        raise ResourceNotFoundError(f"table {table.table_name} not found")
    return True


def row_exists(table: TableClient, partition: str, row: str) -> bool:
    """Whether the row exists (one point read; nothing of it is decoded)."""
    if not fast_path_available(table):
        try:
            table.get_entity(partition, row, select=["RowKey"])
        except ResourceNotFoundError:
            return False
        return True
    keys = f"PartitionKey='{_key(partition)}',RowKey='{_key(row)}'"
    return _send_one(table, "GET", f"{table.table_name}({keys})?$select=RowKey") == 200
