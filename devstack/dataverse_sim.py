"""Dataverse simulator entry point: importable (`from devstack.dataverse_sim import DataverseSimulator`)
and runnable as a process:

    python -m devstack.dataverse_sim --port 7380 [--https --cert server.pem --key server.key | --certs-dir D]
        [--requests 6000 --execution-ms 1200000 --concurrency 52 --window-seconds 300]
        [--penalty-extension-seconds 1]
        [--base-ms 5 --per-record-ms 10 --sleep-fraction 0] [--dop-hint 8] [--no-bulk] [--id-seed S]
        [--check-audience]

In-process (tests): `sim = DataverseSimulator(certfile=..., keyfile=..., config=SimConfig(...),
limits=Limits(...), manual_clock=True, id_seed="x").start()`; `sim.url` is the instance URL and
`sim.api_url` the Web API root; then add_user(email, enabled=, accessmode=, privileges=, oid=),
set_privileges, set_user, add_team, define_key(status=), remove_keys, set_bulk_messages, configure(**any
SimConfig/Limits/StoreConfig field), script_faults(Fault(...)), set_fault_rates, release_held, clear_faults,
revoke_tokens, clock.advance(s), rows(entity_set), contacts_by_external_id, request_log(), counters(),
in_flight(), internal_errors, reset(), stop(). tests/fixtures/dataverse.py has fixtures and unsigned tokens.

A separate process is driven through `/_sim/...` (no auth; local only):
GET rows/<set>, log?limit=N, counters, config; POST users, users/<id> {enabled, accessmode},
users/<id>/privileges, keys, config, faults, faults/clear, faults/release, revoke-tokens, reset,
clock/advance; DELETE keys.

The implementation is the devstack/dataverse/ package; its behaviour follows the fidelity checklist of
research/dataverse.md (tests/test_dataverse_sim.py names the item each test covers).
"""

from __future__ import annotations

import argparse

from devstack.dataverse import ADMIN_PRIVILEGES, DataverseSimulator, Fault, Limits, SimConfig, StoreConfig
from devstack.http_server import serve_until_terminated

__all__ = ["ADMIN_PRIVILEGES", "DataverseSimulator", "Fault", "Limits", "SimConfig", "StoreConfig", "main"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--https", action="store_true")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--certs-dir", help="create/reuse a test CA and server certificate here (with --https)")
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--execution-ms", type=int, default=1_200_000)
    parser.add_argument("--concurrency", type=int, default=52)
    parser.add_argument("--window-seconds", type=float, default=300.0)
    parser.add_argument("--penalty-extension-seconds", type=float, default=1.0,
                        help="how much each request sent during a penalty extends it")
    parser.add_argument("--base-ms", type=float, default=5.0)
    parser.add_argument("--per-record-ms", type=float, default=10.0)
    parser.add_argument("--sleep-fraction", type=float, default=0.0)
    parser.add_argument("--dop-hint", type=int, default=8)
    parser.add_argument("--no-bulk", action="store_true", help="the contact table offers no *Multiple messages")
    parser.add_argument("--check-audience", action="store_true")
    parser.add_argument("--id-seed")
    args = parser.parse_args(argv)

    cert, key = args.cert, args.key
    if args.https and not (cert and key):
        if not args.certs_dir:
            parser.error("--https needs --cert and --key, or --certs-dir")
        from pathlib import Path

        from devstack.certs import make_certs

        certs = make_certs(Path(args.certs_dir))
        cert, key = certs.server_cert, certs.server_key
    config = SimConfig(dop_hint=args.dop_hint, base_ms=args.base_ms, per_record_ms=args.per_record_ms,
                       sleep_fraction=args.sleep_fraction, check_audience=args.check_audience)
    if args.no_bulk:
        config.bulk_messages = set()
    limits = Limits(requests=args.requests, execution_ms=args.execution_ms, concurrency=args.concurrency,
                    window_seconds=args.window_seconds, penalty_extension_seconds=args.penalty_extension_seconds)
    sim = DataverseSimulator(host=args.host, port=args.port, certfile=cert if args.https else None,
                             keyfile=key if args.https else None, config=config, limits=limits,
                             id_seed=args.id_seed).start()
    serve_until_terminated(sim, lambda url: print(f"Dataverse simulator listening on {url}", flush=True))


if __name__ == "__main__":
    main()
