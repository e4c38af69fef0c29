"""The simulator's bulk requests: CreateMultiple / UpdateMultiple / UpsertMultiple (checklist 17, all or
nothing on a standard table) and `$batch` with change sets, Content-ID references and continue-on-error
(checklist 15, 16)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from devstack.dataverse import multipart
from devstack.dataverse.errors import SimError
from devstack.dataverse.protocol import API_PREFIX, BULK_MESSAGES, Request, Response, segment_not_found, split_segments
from devstack.dataverse.store import Caller

if TYPE_CHECKING:
    from devstack.dataverse.api import WebApi

_MISSING_TYPE = (
    "Error identified in Payload provided by the user for Entity :'', For more information on this error please "
    "follow this help link https://go.microsoft.com/fwlink/?linkid=2195293  ----> InnerException : "
    "Microsoft.OData.ODataException: A resource without a type name was found, but no expected type was "
    "specified. To allow entries without type information, the expected type must also be specified when the "
    "model is specified."
)


class _Rollback(Exception):
    """Unwinds a change set's transaction after a failed operation."""


def bulk_action(api: WebApi, caller: Caller, req: Request, action: str) -> Response:
    message = action.removeprefix("Microsoft.Dynamics.CRM.")
    if not action.startswith("Microsoft.Dynamics.CRM.") or message not in BULK_MESSAGES \
            or message not in api.config.bulk_messages:
        raise segment_not_found(action)
    body = req.json()
    targets = body.get("Targets") if isinstance(body, dict) else None
    if not isinstance(targets, list) or not targets:
        raise SimError(400, "0x80040203", "The Targets parameter is required and must be a non-empty list.")
    if any(not isinstance(t, dict) or "@odata.type" not in t for t in targets):
        raise SimError(400, "0x80048d19", _MISSING_TYPE)
    with api.store.transaction():  # standard tables: all or nothing
        if message == "CreateMultiple":
            ids = [api.store.create(caller, t)["contactid"] for t in targets]
            return Response.of_json(200, {
                "@odata.context": f"{api.base}$metadata#Microsoft.Dynamics.CRM.CreateMultipleResponse",
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
                api.store.update(caller, contact_id, target)
            return Response(204, {"OData-Version": "4.0"}, writes=len(seen))
        return _upsert_multiple(api, caller, targets)


def _upsert_multiple(api: WebApi, caller: Caller, targets: list[dict[str, Any]]) -> Response:
    identities: set[str] = set()
    written: list[str] = []
    for target in targets:
        ref = target.get("@odata.id")
        if ref:
            segments = split_segments(urlsplit(str(ref)).path.split(API_PREFIX)[-1].strip("/"))
            if len(segments) != 1 or segments[0][0] != "contacts" or segments[0][1] is None:
                raise SimError(400, "0x80060888", f"Invalid @odata.id '{ref}'.")
            contact_id, row, alt = api.locate(segments[0][1])
        elif target.get("contactid"):
            contact_id, alt = str(target["contactid"]).lower(), None
            row = api.store.contacts.get(contact_id)
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
            api.store.update(caller, row["contactid"], fields)
            written.append(str(row["contactid"]))
        else:
            if alt and any(k in fields for k in alt):
                raise SimError(400, "0x80040216", "An unexpected error occurred.")
            written.append(str(api.store.create(caller, fields, contact_id=contact_id or None, key=alt)["contactid"]))
    return Response(204, {"OData-Version": "4.0"}, writes=len(targets), written=tuple(written))


def batch(api: WebApi, caller: Caller, req: Request) -> Response:
    items = multipart.parse_batch(req.body, req.headers.get("content-type", ""))
    count = sum(len(i.requests) if isinstance(i, multipart.ChangeSet) else 1 for i in items)
    if count > api.config.max_batch_requests:
        raise SimError(400, "0x80060888", f"The number of requests in the batch ({count}) exceeds the limit of "
                                          f"{api.config.max_batch_requests}.")
    keep_going = "odata.continue-on-error" in req.prefers()
    out: list[multipart.InnerResponse | list[multipart.InnerResponse]] = []
    writes = reads = 0
    failed: multipart.InnerResponse | None = None
    for item in items:
        if isinstance(item, multipart.ChangeSet):
            result, failure, done = _changeset(api, caller, item)
            writes += done
        else:
            resp = _inner(api, caller, item, {})
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


def _changeset(api: WebApi, caller: Caller, changeset: multipart.ChangeSet
               ) -> tuple[list[multipart.InnerResponse], multipart.InnerResponse | None, int]:
    """Runs atomically: any failure rolls back the whole change set and is its only response."""
    results: list[multipart.InnerResponse] = []
    writes = 0
    references: dict[str, str] = {}
    failure: multipart.InnerResponse | None = None
    try:
        with api.store.transaction():
            for inner in changeset.requests:
                if inner.method == "GET":
                    resp = Response.of_error(SimError(400, "0x80060888", "GET requests are not allowed inside "
                                                                         "a change set."))
                else:
                    resp = _inner(api, caller, inner, references)
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


def _inner(api: WebApi, caller: Caller, inner: multipart.InnerRequest, references: dict[str, str]) -> Response:
    url = inner.url
    if url.startswith("$"):
        ref, _, tail = url[1:].partition("/")
        if ref not in references:
            return Response.of_error(SimError(400, "0x80060888", f"Content-ID Reference: '${ref}' does not exist "
                                                                 "in the batch context."))
        url = references[ref] + ("/" + tail if tail else "")
    if url.split("?")[0].rstrip("/").endswith("$batch"):
        return Response.of_error(SimError(400, "0x80060888", "Batches cannot be nested."))
    injected = api.part_fault(inner.method, url)
    if injected is not None:
        return Response.of_error(injected)
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
    return api.handle(caller, Request(inner.method, target, inner.headers, body))
