"""The front end of the local stack's HTTP group: one port that spreads requests over the HTTP instances.

In Azure the platform's front end sends each request to one instance of the app's HTTP group; locally
devstack/stack.py runs this in front of the dev hosts started with `--functions http`, so that webhooks,
the connections API and the OAuth callback reach every HTTP instance through one URL.

Requests go to the instances in turn. An instance that refuses the connection (killed, restarting) is
skipped for the next one, since the request never reached it; one that dies while answering costs that
request a 502, as a caller of a crashed instance sees. With no instance up the answer is 503.

Connections to the instances are kept open and reused, as Azure's front end keeps its connections to the
workers (a new TCP connection per request cost the front and the instance, which starts a thread per
connection, more CPU than forwarding the request). A kept connection the instance has closed (an idle
timeout, a restart, a kill) is seen before it is used and replaced, as urllib3 checks its pooled ones, so
a request is never sent into a connection known to be dead.

    python -m devstack.front --port 7071 --backend 127.0.0.1:7072 --backend 127.0.0.1:7073
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import logging
import signal
import sys
import threading
from collections import defaultdict
from dataclasses import dataclass

from devstack.http_server import connection_dropped, make_server

log = logging.getLogger("front")
# Hop-by-hop headers (RFC 9110 §7.6.1) and the length, which the local server sets itself.
_NOT_FORWARDED = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                            "upgrade", "content-length"})


@dataclass(frozen=True)
class Backend:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Backend:
        host, _, port = text.rpartition(":")
        return cls(host or "127.0.0.1", int(port))


class Front:
    def __init__(self, backends: list[Backend], timeout: float = 300.0) -> None:
        if not backends:
            raise ValueError("at least one backend is needed")
        self.backends, self.timeout = backends, timeout
        self._turn = itertools.cycle(range(len(backends)))
        self._lock = threading.Lock()
        self._idle: dict[Backend, list[http.client.HTTPConnection]] = defaultdict(list)  # kept, not in use
        self.connections_opened = 0

    def _order(self) -> list[Backend]:
        with self._lock:
            start = next(self._turn)
        return self.backends[start:] + self.backends[:start]

    def _connection(self, backend: Backend) -> http.client.HTTPConnection | None:
        """A kept connection to the instance that is still open, or a new one; None when it refuses."""
        while True:
            with self._lock:
                conn = self._idle[backend].pop() if self._idle[backend] else None
            if conn is None:
                break
            if not connection_dropped(conn):
                return conn
            conn.close()
        conn = http.client.HTTPConnection(backend.host, backend.port, timeout=self.timeout)
        try:
            conn.connect()
        except OSError:
            conn.close()
            return None
        with self._lock:
            self.connections_opened += 1
        return conn

    def _keep(self, backend: Backend, conn: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
        if response.will_close:  # the instance said it closes this one
            conn.close()
            return
        with self._lock:
            self._idle[backend].append(conn)

    def dispatch(self, method: str, raw_path: str, headers: dict[str, str], body: bytes
                 ) -> tuple[int, dict[str, str], bytes]:
        forwarded = {k: v for k, v in headers.items() if k not in _NOT_FORWARDED}
        for backend in self._order():
            conn = self._connection(backend)
            if conn is None:
                continue  # nothing was sent: the next instance gets the request
            try:
                conn.request(method, raw_path, body=body, headers=forwarded)
                response = conn.getresponse()
                payload = response.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                log.warning("front: %s:%d failed during %s %s: %s", backend.host, backend.port, method,
                            raw_path.split("?", 1)[0], type(exc).__name__)
                return _error(502, "instance_failed", "the instance serving the request failed")
            self._keep(backend, conn, response)
            out = {k: v for k, v in response.getheaders() if k.lower() not in _NOT_FORWARDED}
            return response.status, out, payload
        return _error(503, "no_instance", "no HTTP instance is running")

    def close(self) -> None:
        with self._lock:
            kept = [conn for conns in self._idle.values() for conn in conns]
            self._idle.clear()
        for conn in kept:
            conn.close()


def _error(status: int, code: str, message: str) -> tuple[int, dict[str, str], bytes]:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return status, {"Content-Type": "application/json; charset=utf-8"}, body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", action="append", required=True, metavar="HOST:PORT",
                        help="an HTTP instance (repeat for each)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    front = Front([Backend.parse(b) for b in args.backend])
    server = make_server(front.dispatch, "127.0.0.1", args.port)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    log.info("front: listening on 127.0.0.1:%d for %s", args.port,
             ", ".join(f"{b.host}:{b.port}" for b in front.backends))
    server.serve_forever()
    server.server_close()
    front.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
