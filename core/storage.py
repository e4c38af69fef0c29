"""Storage queue and table clients built from the storage settings.

Every queue client here encodes base64: the Functions queue trigger expects base64 and silently
moves anything else to the poison queue after maxDequeueCount attempts.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any, Generic, TypeVar

import requests
from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError
from azure.core.pipeline.transport import RequestsTransport
from azure.data.tables import EdmType, EntityProperty, TableClient, TableServiceClient, TableTransactionError
from azure.identity import DefaultAzureCredential
from azure.storage.queue import QueueClient, TextBase64DecodePolicy, TextBase64EncodePolicy
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from core.settings import StorageSettings

CONTACT_EVENTS = "contact-events"
BACKFILL_PAGES = "backfill-pages"
QUEUES = (CONTACT_EVENTS, BACKFILL_PAGES)
POISON_SUFFIX = "-poison"
# Storage caps a message at 64 KiB; base64 costs a third of that.
MAX_MESSAGE_BYTES = 48 * 1024
C = TypeVar("C")
# Connections kept open per storage endpoint. The SDK's default pool is requests' 10, fewer than the threads
# that call storage at once (host.json's 24 messages per queue function, PYTHON_THREADPOOL_THREAD_COUNT 64,
# core/tables.py's 8 side-by-side threads): every extra call opened and dropped a connection ("Connection
# pool is full, discarding connection").
POOL_CONNECTIONS = 96


def _transport() -> RequestsTransport:
    """The SDK's HTTP transport without environment lookups: requests' default (`trust_env`) re-reads the
    proxy and netrc settings on every call, which cost more CPU than the rest of a small call; storage is
    reached directly (https://learn.microsoft.com/azure/developer/python/sdk/azure-sdk-configure-proxy
    describes the proxy environment this turns off)."""
    session = requests.Session()
    session.trust_env = False
    # no retries inside requests: the SDK's own retry policy retries, as with its default transport
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=POOL_CONNECTIONS,
                                            max_retries=Retry(total=False, redirect=False, raise_on_status=False))
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return RequestsTransport(session=session, session_owner=False, use_env_settings=False)


def poison_queue_name(queue_name: str) -> str:
    return queue_name + POISON_SUFFIX


def _credential(storage: StorageSettings) -> DefaultAzureCredential:
    return DefaultAzureCredential(managed_identity_client_id=storage.managed_identity_client_id)


def queue_client(storage: StorageSettings, queue_name: str) -> QueueClient:
    encode, decode = TextBase64EncodePolicy(), TextBase64DecodePolicy()
    if storage.connection_string:
        return QueueClient.from_connection_string(storage.connection_string, queue_name, transport=_transport(),
                                                  message_encode_policy=encode, message_decode_policy=decode)
    return QueueClient(_service_uri(storage.queue_service_uri), queue_name, credential=_credential(storage),
                       transport=_transport(), message_encode_policy=encode, message_decode_policy=decode)


def table_service(storage: StorageSettings) -> TableServiceClient:
    if storage.connection_string:
        return TableServiceClient.from_connection_string(storage.connection_string, transport=_transport())
    return TableServiceClient(_service_uri(storage.table_service_uri), credential=_credential(storage),
                              transport=_transport())


def _service_uri(uri: str | None) -> str:
    if not uri:  # core/settings.py sets both URIs whenever it sets no connection string
        raise ValueError("storage settings have neither a connection string nor service URIs")
    return uri


def ensure_queue(client: QueueClient) -> QueueClient:
    with contextlib.suppress(ResourceExistsError):
        client.create_queue()
    return client


class _ByName(Generic[C]):
    """Clients by name, each made (and its queue or table created) once per process."""

    def __init__(self, make: Callable[[str], C]) -> None:
        self._make = make
        self._clients: dict[str, C] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> C:
        with self._lock:
            found = self._clients.get(name)
            if found is None:
                found = self._clients[name] = self._make(name)
            return found


class QueueSender:
    """Sends small JSON messages, base64-encoded, creating the queue on first use."""

    def __init__(self, storage: StorageSettings) -> None:
        self._clients = _ByName(lambda name: ensure_queue(queue_client(storage, name)))

    def client(self, queue_name: str) -> QueueClient:
        return self._clients.get(queue_name)

    def send(self, queue_name: str, message: dict[str, Any], *, delay_seconds: int = 0) -> None:
        text = json.dumps(message, separators=(",", ":"), sort_keys=True)
        if len(text.encode()) > MAX_MESSAGE_BYTES:
            raise ValueError(f"queue message for {queue_name} is {len(text)} bytes; keep messages to ids")
        # Storage caps the initial invisibility at 7 days.
        delay = max(0, min(int(delay_seconds), 7 * 24 * 3600))
        self.client(queue_name).send_message(text, visibility_timeout=delay or None)


class Tables:
    """Table clients by name, each table created once per process."""

    def __init__(self, storage: StorageSettings) -> None:
        service = table_service(storage)
        self._clients = _ByName(service.create_table_if_not_exists)

    def __call__(self, table_name: str) -> TableClient:
        return self._clients.get(table_name)


def iso(moment: datetime) -> str:
    """A UTC time as the tables store it: text that sorts (and compares in a filter) like the time."""
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def int64(value: int) -> EntityProperty:
    """An integer stored as Edm.Int64. The SDK writes a plain Python int as Edm.Int32 and refuses 2**31 and
    above, while a Wave version may be anything up to 2**53 (a millisecond timestamp, say); see "Property
    types" in https://learn.microsoft.com/en-us/rest/api/storageservices/understanding-the-table-service-data-model
    """
    return EntityProperty(int(value), EdmType.INT64)


def read_int(value: object) -> int | None:
    """An integer property as the SDK reads it back: a plain int for Edm.Int32 (rows written before
    `int64`), an EntityProperty for Edm.Int64, or None when the row has no such property."""
    if value is None:
        return None
    if isinstance(value, EntityProperty):
        value = value.value
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"not an integer property: {type(value).__name__}")
    return int(value)


def delete_expired(table: TableClient, cutoff: str) -> int:
    """Delete the rows whose `expires_at` (ISO-8601 UTC text) is at or before `cutoff`; returns how many."""
    return delete_rows(table, "expires_at le @cutoff", {"cutoff": cutoff})[0]


def delete_rows(table: TableClient, query: str, parameters: dict[str, str], *, limit: int | None = None
                ) -> tuple[int, bool]:
    """Delete the rows `query` matches, at most `limit` of them; returns (how many, whether all were seen).

    Each delete is conditional on the row being as it was read, so a row renewed meanwhile stays. They go
    in transactions of up to 100 rows of one partition; a transaction refused because one of its rows
    changed or went is done again row by row."""
    by_partition: dict[str, list[Any]] = {}
    complete = True
    rows_read = table.query_entities(query, parameters=parameters, select=["PartitionKey", "RowKey"])
    for seen, entity in enumerate(rows_read):
        if limit is not None and seen >= limit:
            complete = False
            break
        by_partition.setdefault(entity["PartitionKey"], []).append(entity)
    removed = 0
    for rows in by_partition.values():
        for start in range(0, len(rows), 100):
            chunk = rows[start:start + 100]
            try:
                table.submit_transaction([("delete", e, {"etag": e.metadata["etag"],
                                                         "match_condition": MatchConditions.IfNotModified})
                                          for e in chunk])
                removed += len(chunk)
                continue
            except TableTransactionError:
                pass
            for e in chunk:
                with contextlib.suppress(ResourceModifiedError):
                    table.delete_entity(e["PartitionKey"], e["RowKey"], etag=e.metadata["etag"],
                                        match_condition=MatchConditions.IfNotModified)
                    removed += 1
    return removed, complete
