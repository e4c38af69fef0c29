"""`$batch` wire format on the simulator side: parse a multipart/mixed request, render the response
(research/dataverse.md §5, checklist 15)."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus

from devstack.dataverse.errors import SimError

_BOUNDARY_RE = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)


@dataclass
class InnerRequest:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes
    content_id: str | None = None


@dataclass
class ChangeSet:
    requests: list[InnerRequest] = field(default_factory=list)


@dataclass
class InnerResponse:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    content_id: str | None = None


def boundary_of(content_type: str) -> str:
    match = _BOUNDARY_RE.search(content_type or "")
    if not match or not content_type.lower().startswith("multipart/mixed"):
        raise SimError(400, "0x80060888", "The batch request must have a Content-Type of multipart/mixed "
                                          "with a boundary.")
    return match.group(1)


def _split(text: str, boundary: str) -> list[str]:
    delimiter, parts, current = "--" + boundary, [], None
    for line in text.splitlines(keepends=True):
        bare = line.rstrip("\r\n")
        if bare == delimiter:
            if current is not None:
                parts.append("".join(current))
            current = []
        elif bare == delimiter + "--":
            if current is not None:
                parts.append("".join(current))
            return [p[:-2] if p.endswith("\r\n") else p[:-1] if p.endswith("\n") else p for p in parts]
        elif current is not None:
            current.append(line)
    raise SimError(400, "0x80060888", f"The batch is missing its closing boundary '--{boundary}--'.")


def _headers_and_body(block: str) -> tuple[dict[str, str], str]:
    if block.startswith(("\r\n", "\n")):  # no headers at all
        return {}, block.partition("\n")[2]
    head, sep, body = block.partition("\r\n\r\n")
    if not sep:
        head, _, body = block.partition("\n\n")
    headers = {}
    for line in head.splitlines():
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return headers, body


def _inner_request(part_headers: dict[str, str], payload: str) -> InnerRequest:
    lines = payload.lstrip("\r\n")
    request_line, _, rest = lines.partition("\n")
    bits = request_line.strip().split(" ")
    if len(bits) < 2:
        raise SimError(400, "0x80060888", f"Malformed request line in batch: '{request_line.strip()}'.")
    headers, body = _headers_and_body(rest)
    return InnerRequest(bits[0].upper(), bits[1], headers, body.rstrip("\r\n").encode(),
                        part_headers.get("content-id") or headers.get("content-id"))


def parse_batch(body: bytes, content_type: str) -> list[InnerRequest | ChangeSet]:
    items: list[InnerRequest | ChangeSet] = []
    for part in _split(body.decode("utf-8"), boundary_of(content_type)):
        headers, payload = _headers_and_body(part.lstrip("\r\n"))
        if headers.get("content-type", "").lower().startswith("multipart/mixed"):
            changeset = ChangeSet()
            for inner in _split(payload, boundary_of(headers["content-type"])):
                inner_headers, inner_payload = _headers_and_body(inner.lstrip("\r\n"))
                changeset.requests.append(_inner_request(inner_headers, inner_payload))
            items.append(changeset)
        else:
            items.append(_inner_request(headers, payload))
    return items


def _render_response(resp: InnerResponse) -> str:
    reason = HTTPStatus(resp.status).phrase
    lines = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if resp.content_id:
        lines.append(f"Content-ID: {resp.content_id}")
    lines += ["", f"HTTP/1.1 {resp.status} {reason}"]
    lines += [f"{k}: {v}" for k, v in resp.headers.items()]
    lines += ["", resp.body.decode("utf-8")]
    return "\r\n".join(lines)


def render_batch(items: list[InnerResponse | list[InnerResponse]]) -> tuple[str, bytes]:
    """Returns (content type, body). A list inside `items` is a change set's responses."""
    boundary = f"batchresponse_{uuid.uuid4()}"
    out = []
    for item in items:
        out.append(f"--{boundary}")
        if isinstance(item, list):
            cs = f"changesetresponse_{uuid.uuid4()}"
            inner = [f"--{cs}\r\n{_render_response(r)}" for r in item]
            out.append(f"Content-Type: multipart/mixed; boundary={cs}\r\n\r\n" + "\r\n".join(inner) + f"\r\n--{cs}--")
        else:
            out.append(_render_response(item))
    out.append(f"--{boundary}--")
    return f"multipart/mixed; boundary={boundary}", ("\r\n".join(out) + "\r\n").encode()
