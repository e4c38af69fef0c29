"""Process start-up: logging with redaction, and secrets registered before anything logs."""

import logging
import os

from core.log import install_redaction, register_secret

_SECRET_SETTINGS = ("DYNAMICS_CLIENT_SECRET", "WAVE_API_TOKEN")


def configure_logging() -> None:
    install_redaction()
    register_secret(*(os.environ.get(name) for name in _SECRET_SETTINGS))
    register_secret(*os.environ.get("WAVE_WEBHOOK_SECRETS", "").split(","))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for noisy in ("azure.core.pipeline.policies.http_logging_policy", "azure.identity", "urllib3", "msal"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
