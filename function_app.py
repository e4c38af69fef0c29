"""Azure Functions entry point: wiring only. Each feature lives in its own blueprint."""

import azure.functions as func

from core.bootstrap import configure_logging, report_settings
from core.health import bp as health_bp
from oauth.api import bp as oauth_bp
from sync.backfill import bp as backfill_bp
from sync.routes import bp as sync_routes_bp
from sync.upkeep import bp as upkeep_bp
from sync.webhook import bp as webhook_bp
from sync.worker import bp as worker_bp

configure_logging()
report_settings()

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
app.register_functions(health_bp)
app.register_functions(oauth_bp)
app.register_functions(webhook_bp)
app.register_functions(worker_bp)
app.register_functions(backfill_bp)
app.register_functions(sync_routes_bp)
app.register_functions(upkeep_bp)
