"""`make demo`: start the local stack and the dev host, check health, print the endpoints.

(The full end-to-end run - seeding Wave, connecting, backfill, live events - builds on this.)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading

import requests

from devstack.processes import free_port, start_azurite


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the Wave -> Dynamics 365 sync on the local stack.")
    parser.add_argument("--keep-running", action="store_true", help="leave the stack running until Ctrl-C")
    args = parser.parse_args(argv)

    azurite = start_azurite()
    try:
        os.environ.update({
            "AzureWebJobsStorage": azurite.connection_string,
            "APP_ENV": "development",
            "KEY_VAULT_URL": "https://127.0.0.1:9",
            "DYNAMICS_CLIENT_ID": "11111111-2222-3333-4444-555555555555",
            "DYNAMICS_CLIENT_SECRET": "demo-client-secret",
            "OAUTH_REDIRECT_URI": "http://localhost:7071/api/oauth/callback",
            "WAVE_WEBHOOK_SECRETS": "whsec_demo_0123456789",
            "WAVE_API_BASE_URL": "http://127.0.0.1:9",
            "WAVE_API_TOKEN": "demo-wave-token",
            "WAVE_RETURN_URL_PREFIXES": "http://127.0.0.1/",
        })
        from devstack.devhost import DevHost
        from function_app import app

        with DevHost(app, connection_strings={"AzureWebJobsStorage": azurite.connection_string},
                     function_key="demo-function-key", master_key="demo-master-key", port=free_port()) as host:
            health = requests.get(f"{host.url}/api/health", timeout=10)
            print(f"health: {health.status_code} {health.text}")
            print(f"dev host:   {host.url}/api/  (function key: demo-function-key)")
            print(f"azurite:    queues 127.0.0.1:{azurite.queue_port}, tables 127.0.0.1:{azurite.table_port}")
            if health.status_code != 200:
                return 1
            if args.keep_running:
                print("running; Ctrl-C stops the stack")
                with contextlib.suppress(KeyboardInterrupt):
                    threading.Event().wait()
        return 0
    finally:
        azurite.stop()


if __name__ == "__main__":
    sys.exit(main())
