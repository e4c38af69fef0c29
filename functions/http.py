"""Small helpers for HTTP handlers: JSON answers, the error body every route shares, and the blueprint
every HTTP route is declared on."""

from __future__ import annotations

import functools
import inspect
import json
import logging
from collections.abc import Callable
from typing import Any

import azure.functions as func

from core.log import outcome
from core.settings import settings_problem

JSON = "application/json"
log = logging.getLogger(__name__)

Handler = Callable[..., func.HttpResponse]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> func.HttpResponse:
    return func.HttpResponse(
        json.dumps(body, default=str), status_code=status, mimetype=JSON, headers=headers or {}
    )


def error_response(status: int, code: str, message: str, **details: Any) -> func.HttpResponse:
    """`{"error": {"code", "message", ...details}}`: the code is stable, the message is for people."""
    error = {"code": code, "message": message, **{k: v for k, v in details.items() if v is not None}}
    return json_response({"error": error}, status)


def settings_unavailable() -> func.HttpResponse | None:
    """503 naming the first unusable setting (never its value), or None when the settings are usable."""
    problem = settings_problem()
    if problem is None:
        return None
    outcome(log, "settings", "unavailable", level=logging.ERROR, setting=problem.name)
    return error_response(503, "settings_invalid",
                          f"the app cannot serve requests: setting {problem.name} {problem.problem}",
                          setting=problem.name)


def _guarded(handler: Handler) -> Handler:
    @functools.wraps(handler)  # the host reads the parameter names (the trigger's arg_name) through it
    def guarded(*args: Any, **kwargs: Any) -> func.HttpResponse:
        return settings_unavailable() or handler(*args, **kwargs)

    return guarded


class Blueprint(func.Blueprint):
    """A Functions blueprint whose HTTP routes answer 503 JSON while a setting is unusable.

    In Azure a bad setting cannot stop the host from starting, so without this every route would fail
    with a bare 500 (or, for an unresolved Key Vault reference, run with the reference's text as the
    secret) while GET /api/health said 200. Declare `@bp.route` directly above the `def`, so that it
    receives the handler itself.
    """

    def route(self, *args: Any, **kwargs: Any) -> Callable[..., Any]:
        declare = super().route(*args, **kwargs)

        def decorator(handler: Any) -> Any:
            if not inspect.isfunction(handler):
                raise TypeError("declare @bp.route directly above the handler's def (it must receive the "
                                "function, to answer 503 while a setting is unusable)")
            return declare(_guarded(handler))

        return decorator
