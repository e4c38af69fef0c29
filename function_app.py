"""Azure Functions entry point: wiring only. The trigger and route modules live in functions/."""

import azure.functions as func

from core.bootstrap import configure_logging, report_settings
from functions.connections import bp as connections_bp
from functions.health import bp as health_bp
from functions.timers import bp as timers_bp
from functions.webhook import bp as webhook_bp
from functions.workers import bp as workers_bp

configure_logging()
report_settings()

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
app.register_functions(health_bp)
app.register_functions(connections_bp)
app.register_functions(webhook_bp)
app.register_functions(workers_bp)
app.register_functions(timers_bp)
