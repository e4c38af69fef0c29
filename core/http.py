"""Small helpers for HTTP handlers: JSON answers and the error body every route shares."""

from __future__ import annotations

import json
from typing import Any

import azure.functions as func

JSON = "application/json"


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> func.HttpResponse:
    return func.HttpResponse(
        json.dumps(body, default=str), status_code=status, mimetype=JSON, headers=headers or {}
    )


def error_response(status: int, code: str, message: str, **details: Any) -> func.HttpResponse:
    """`{"error": {"code", "message", ...details}}`: the code is stable, the message is for people."""
    error = {"code": code, "message": message, **{k: v for k, v in details.items() if v is not None}}
    return json_response({"error": error}, status)
