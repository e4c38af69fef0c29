"""Producers always write base64; log lines never carry secrets."""

from __future__ import annotations

import base64
import json
import logging

from azure.storage.queue import QueueClient

from core.log import install_redaction, outcome, redact, register_secret
from core.settings import StorageSettings
from core.storage import QueueSender


def test_queue_sender_writes_base64_on_the_wire(azurite):
    sender = QueueSender(StorageSettings(connection_string=azurite.connection_string))
    sender.send("wire-format", {"account_id": "acct_1", "contact_id": "c_1"})
    raw = QueueClient.from_connection_string(azurite.connection_string, "wire-format")
    [message] = list(raw.peek_messages())
    assert json.loads(base64.b64decode(message.content, validate=True)) == {
        "account_id": "acct_1", "contact_id": "c_1"}


def test_queue_sender_refuses_oversized_messages(azurite):
    sender = QueueSender(StorageSettings(connection_string=azurite.connection_string))
    try:
        sender.send("wire-format-big", {"blob": "x" * 60_000})
    except ValueError as exc:
        assert "keep messages to ids" in str(exc)
    else:
        raise AssertionError("an oversized message was accepted")


def test_redaction_masks_tokens_codes_and_registered_secrets(caplog):
    install_redaction()
    register_secret("client-secret-123456")
    log = logging.getLogger("test.redaction")
    with caplog.at_level(logging.INFO):
        log.info("calling with Authorization: Bearer eyJabc.def.ghi and client-secret-123456")
        log.info("callback ?code=0.AXoAsecretcode&state=abc")
        outcome(log, "http", "failed", detail='{"refresh_token": "rt-value", "ok": 1}')
    text = "\n".join(r.getMessage() for r in caplog.records)
    for leaked in ("eyJabc", "client-secret-123456", "0.AXoAsecretcode", "rt-value"):
        assert leaked not in text
    assert "state=abc" in text and '\\"ok\\": 1' in text
    assert redact("v1=abcdef0123,t=1") == "v1=[redacted],t=1"
