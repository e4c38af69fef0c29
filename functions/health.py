"""GET /api/health: anonymous, touches no storage.

200 when the app can serve; 503 naming the first unusable setting (never its value) otherwise, like
every other route (functions/http.py), so a deployment whose Key Vault reference did not resolve is
seen as unhealthy instead of running with the reference's text as a secret.
"""

import azure.functions as func

from functions.http import Blueprint, json_response

bp = Blueprint()


@bp.function_name("health")
@bp.route(route="health", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def health(req: func.HttpRequest) -> func.HttpResponse:
    return json_response({"status": "ok"})
