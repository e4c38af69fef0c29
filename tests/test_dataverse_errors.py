"""dataverse.errors.error_for: status and Dataverse error code -> typed error (pure, table-driven)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from core.retry_after import retry_after_seconds
from dataverse.errors import (
    AuthExpired,
    Conflict,
    NotFound,
    PermissionDenied,
    Throttled,
    Transient,
    ValidationFailed,
    error_for,
)


def body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


CASES = [
    (400, body("0x80044331", "A validation error occurred.  The length of the 'jobtitle' attribute of the 'contact' "
                             "entity exceeded the maximum allowed length of '100'."),
     ValidationFailed, {"field": "jobtitle", "code": "0x80044331"}),
    (400, body("0x80060888", "The property 'nickname' does not exist on type 'Microsoft.Dynamics.CRM.contact'."),
     ValidationFailed, {"field": "nickname"}),
    (400, body("0x80040225", "The specified user(Id = 1) is disabled. Consider enabling this user."),
     ValidationFailed, {"field": "ownerid"}),
    (400, body("0x80040203", "Invalid argument."), ValidationFailed, {"field": None}),
    (401, b"", AuthExpired, {"status": 401}),
    (403, body("0x80040220", "Principal user (Id=x, type=8, roleCount=1) is missing prvWriteContact privilege "
                             "(Id=y) on OTC=2 for entity 'contact'."),
     PermissionDenied, {"privilege": "prvWriteContact"}),
    (403, body("0x80040220", "The user does not hold the necessary privileges."), PermissionDenied,
     {"privilege": None}),
    (404, body("0x80040217", "systemuser With Id = 9 Does Not Exist"), NotFound, {"entity": "systemuser"}),
    (404, body("0x80040217", "contact With Id = 9 Does Not Exist"), NotFound, {"entity": "contact"}),
    (412, body("0x80060882", "The version of the existing record doesn't match the RowVersion property provided."),
     Conflict, {"code": "0x80060882"}),
    (412, body("0x80040237", "A record with matching key values already exists."), Conflict, {}),
    (500, body("0x80040333", "A record was not created or updated because a duplicate of the current record "
                             "already exists."), Conflict, {"status": 500}),
    (500, body("0x80040216", "An unexpected error occurred."), Transient, {}),
    (502, b"<html>Bad Gateway</html>", Transient, {"message": "<html>Bad Gateway</html>"}),
    (503, body("", "Service Unavailable"), Transient, {}),
    (504, b"", Transient, {"message": "HTTP 504"}),
    (429, body("0x80072321", "Combined execution time ..."), Throttled, {"limit": "execution time"}),
]


@pytest.mark.parametrize(("status", "raw", "cls", "attrs"), CASES)
def test_error_for(status: int, raw: bytes, cls: type, attrs: dict) -> None:
    error = error_for(status, raw, {"Retry-After": "30"})
    assert type(error) is cls
    for name, value in attrs.items():
        assert getattr(error, name) == value, name
    assert error.category and str(error)


def test_throttled_reads_retry_after() -> None:
    error = error_for(429, body("0x80072322", "Number of requests exceeded ..."), {"Retry-After": "12"})
    assert isinstance(error, Throttled) and error.retry_after == 12 and error.limit == "requests"


def test_retry_after_forms() -> None:
    assert retry_after_seconds("3") == 3
    assert retry_after_seconds("0.5") == 0.5
    assert retry_after_seconds(None) == 5.0  # absent: a cautious default
    assert retry_after_seconds("soon") == 5.0
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=40), usegmt=True)
    assert 35 <= retry_after_seconds(later) <= 40
