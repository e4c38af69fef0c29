"""Process start-up: logging with redaction, secrets registered before anything logs, and the settings
checked once so that an unusable one is named in the log at start-up."""

import logging
import os

from core.log import install_redaction, register_secret
from core.settings import settings_problem

_SECRET_SETTINGS = ("DYNAMICS_CLIENT_SECRET", "WAVE_API_TOKEN")


def configure_logging() -> None:
    install_redaction()
    register_secret(*(os.environ.get(name) for name in _SECRET_SETTINGS))
    register_secret(*os.environ.get("WAVE_WEBHOOK_SECRETS", "").split(","))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for noisy in ("azure.core.pipeline.policies.http_logging_policy", "azure.identity", "urllib3", "msal"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def report_settings() -> None:
    """Name an unusable setting at start-up. The Functions host starts whatever the app's settings say, so
    the app cannot refuse to run: every HTTP route answers 503 instead (functions/http.py)."""
    problem = settings_problem()
    if problem is not None:
        logging.getLogger(__name__).error("error: %s; every HTTP route answers 503 until it is fixed", problem)
