"""POST /api/webhooks/wave (anonymous at the Functions level; the HMAC signature is the auth).

The checks and what an accepted event does are sync/webhook.py's; this module reads the request and
writes the answer.
"""

from __future__ import annotations

import logging
import time

import azure.functions as func

from core.log import Timer, outcome
from functions.http import Blueprint, error_response, json_response
from functions.services import services
from sync.signature import HEADER
from sync.webhook import Answer, accept_event, check_request

log = logging.getLogger("sync.webhook")
bp = Blueprint()


@bp.function_name("wave_webhook")
@bp.route(route="webhooks/wave", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
def wave_webhook(req: func.HttpRequest) -> func.HttpResponse:
    timer = Timer()
    svc = services()
    checked = check_request(req.get_body() or b"", req.headers.get(HEADER), svc.settings.wave_webhook_secrets,
                            time.time())
    if isinstance(checked, Answer):
        answer = checked
    else:
        answer = accept_event(checked, connections=svc.live_connections, pending=svc.pending, queues=svc.queues)
    result = answer.body.get("status") or "rejected"
    outcome(log, "webhook", result, level=logging.INFO if answer.status < 400 else logging.WARNING,
            status=answer.status, ms=timer.ms, **answer.log_fields)
    if answer.status >= 400:
        error = answer.body["error"]
        details = {k: v for k, v in error.items() if k not in ("code", "message")}
        return error_response(answer.status, error["code"], error["message"], **details)
    return json_response(answer.body, answer.status)
