"""`$batch` wire format on the client side: build a multipart/mixed request of independent operations,
parse the multipart response (change sets flattened) into per-part statuses, in order."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any


@dataclass(frozen=True)
class BatchPart:
    method: str
    url: str  # relative to the Web API root, e.g. "contacts(<id>)"
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PartResponse:
    status: int
    headers: dict[str, str]
    body: bytes


class BatchFormatError(ValueError):
    """The $batch response could not be parsed."""


def build_batch(parts: list[BatchPart], api_path: str) -> tuple[str, bytes]:
    """(Content-Type header, body). `api_path` is the Web API root path, e.g. /api/data/v9.2/."""
    boundary = f"batch_{uuid.uuid4()}"
    lines: list[str] = []
    for part in parts:
        lines += [f"--{boundary}", "Content-Type: application/http", "Content-Transfer-Encoding: binary", ""]
        lines.append(f"{part.method} {api_path}{part.url} HTTP/1.1")
        headers = dict(part.headers)
        if part.body is not None:
            headers.setdefault("Content-Type", "application/json")
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines.append("")
        lines.append(json.dumps(part.body, ensure_ascii=False) if part.body is not None else "")
    lines.append(f"--{boundary}--")
    return f"multipart/mixed; boundary={boundary}", ("\r\n".join(lines) + "\r\n").encode("utf-8")


def _http_response(raw: bytes) -> PartResponse:
    text = raw.decode("utf-8", "replace").lstrip("\r\n")
    head, sep, body = text.partition("\r\n\r\n")
    if not sep:
        head, _, body = text.partition("\n\n")
    lines = head.splitlines()
    if not lines or not lines[0].startswith("HTTP/"):
        raise BatchFormatError(f"not an HTTP response: {lines[0][:80] if lines else ''!r}")
    try:
        status = int(lines[0].split(" ")[1])
    except (IndexError, ValueError):
        raise BatchFormatError(f"bad status line {lines[0][:80]!r}") from None
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip()] = value.strip()
    return PartResponse(status, headers, body.strip("\r\n").encode("utf-8"))


def _walk(message: Message, out: list[PartResponse]) -> None:
    for part in message.get_payload():
        if not isinstance(part, Message):
            raise BatchFormatError("a part of the $batch response is not a message")
        if part.is_multipart():
            _walk(part, out)  # a change set's responses
        elif part.get_content_type() == "application/http":
            payload = part.get_payload(decode=True)
            out.append(_http_response(payload if isinstance(payload, bytes) else b""))
        else:
            raise BatchFormatError(f"unexpected part of type {part.get_content_type()}")


def parse_batch_response(content_type: str, body: bytes) -> list[PartResponse]:
    if not content_type.lower().startswith("multipart/mixed"):
        raise BatchFormatError(f"expected multipart/mixed, got {content_type!r}")
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    if not message.is_multipart():
        raise BatchFormatError("the $batch response has no parts")
    out: list[PartResponse] = []
    _walk(message, out)
    return out
