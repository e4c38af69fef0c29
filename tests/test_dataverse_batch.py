"""dataverse.batch: the client's $batch request builder and response parser, on documented shapes."""

from __future__ import annotations

import json

import pytest

from dataverse.batch import BatchFormatError, BatchPart, build_batch, parse_batch_response

# The response shape of Microsoft's "Execute batch operations" page: a change set, then a plain part.
DOC_RESPONSE = (
    "--batchresponse_c1bd45c1-dd81-470d-b897-e965846aad2f\r\n"
    "Content-Type: multipart/mixed; boundary=changesetresponse_ff83b4f1-ab48-430c-b81c-926a2c596abc\r\n"
    "\r\n"
    "--changesetresponse_ff83b4f1-ab48-430c-b81c-926a2c596abc\r\n"
    "Content-Type: application/http\r\n"
    "Content-Transfer-Encoding: binary\r\n"
    "Content-ID: 1\r\n"
    "\r\n"
    "HTTP/1.1 204 No Content\r\n"
    "OData-Version: 4.0\r\n"
    "Location: https://org.api.crm.dynamics.com/api/data/v9.2/tasks(a59c24f3-fafc-ed11-8f6e-000d3a993550)\r\n"
    "OData-EntityId: https://org.api.crm.dynamics.com/api/data/v9.2/tasks(a59c24f3-fafc-ed11-8f6e-000d3a993550)\r\n"
    "\r\n"
    "\r\n"
    "--changesetresponse_ff83b4f1-ab48-430c-b81c-926a2c596abc--\r\n"
    "--batchresponse_c1bd45c1-dd81-470d-b897-e965846aad2f\r\n"
    "Content-Type: application/http\r\n"
    "Content-Transfer-Encoding: binary\r\n"
    "\r\n"
    "HTTP/1.1 400 Bad Request\r\n"
    "Content-Type: application/json; odata.metadata=minimal\r\n"
    "OData-Version: 4.0\r\n"
    "\r\n"
    '{"error":{"code":"0x80044331","message":"A validation error occurred.  The length of the \'subject\' '
    "attribute of the 'task' entity exceeded the maximum allowed length of '200'.\"}}\r\n"
    "--batchresponse_c1bd45c1-dd81-470d-b897-e965846aad2f--\r\n"
)


def test_parses_the_documented_response_with_a_changeset() -> None:
    parts = parse_batch_response("multipart/mixed; boundary=batchresponse_c1bd45c1-dd81-470d-b897-e965846aad2f",
                                 DOC_RESPONSE.encode())
    assert [p.status for p in parts] == [204, 400]
    assert parts[0].headers["OData-EntityId"].endswith("tasks(a59c24f3-fafc-ed11-8f6e-000d3a993550)")
    assert json.loads(parts[1].body)["error"]["code"] == "0x80044331"


def test_builds_independent_parts_with_json_bodies() -> None:
    content_type, body = build_batch([
        BatchPart("PATCH", "contacts(00000000-0000-0000-0000-000000000001)", {"lastname": "Ünicode"}),
        BatchPart("GET", "WhoAmI"),
    ], "/api/data/v9.2/")
    assert content_type.startswith("multipart/mixed; boundary=batch_")
    boundary = content_type.split("boundary=")[1]
    text = body.decode("utf-8")
    assert text.count(f"--{boundary}\r\n") == 2 and text.endswith(f"--{boundary}--\r\n")
    assert "PATCH /api/data/v9.2/contacts(00000000-0000-0000-0000-000000000001) HTTP/1.1\r\n" in text
    assert "Content-Type: application/json\r\n\r\n" + json.dumps({"lastname": "Ünicode"}, ensure_ascii=False) in text
    assert "GET /api/data/v9.2/WhoAmI HTTP/1.1\r\n" in text


@pytest.mark.parametrize(("content_type", "body"), [
    ("application/json", b"{}"),
    ("multipart/mixed; boundary=b", b"--b\r\nContent-Type: application/http\r\n\r\nnot http\r\n--b--\r\n"),
])
def test_unreadable_responses_raise(content_type: str, body: bytes) -> None:
    with pytest.raises(BatchFormatError):
        parse_batch_response(content_type, body)
