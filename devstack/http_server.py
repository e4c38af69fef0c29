"""The HTTP plumbing the local stand-ins share: read a request, hand it to a dispatch function, write
its answer. Each stand-in (dev host, Wave simulator, Key Vault simulator) only decides what to answer."""

from __future__ import annotations

import http.client
import select
import ssl
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

# (method, raw path with query, lower-cased headers, body) -> (status, headers, body)
Dispatch = Callable[[str, str, dict[str, str], bytes], tuple[int, dict[str, str], bytes]]


def handler_class(dispatch: Dispatch) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # headers and body go out in separate writes: without this, Nagle + delayed ACK add ~40 ms
        disable_nagle_algorithm = True

        def log_message(self, *args: Any) -> None:
            pass

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, out_headers, payload = dispatch(self.command, self.path, headers, body)
            self.send_response(status)
            for key, value in out_headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _serve

    return Handler


def make_server(dispatch: Dispatch, host: str, port: int, *, certfile: Path | str | None = None,
                keyfile: Path | str | None = None) -> ThreadingHTTPServer:
    """A threading server for `dispatch`, over HTTPS when a certificate is given."""
    server = ThreadingHTTPServer((host, port), handler_class(dispatch))
    server.daemon_threads = True
    if certfile:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(certfile), str(keyfile))
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    return server


def connection_dropped(conn: http.client.HTTPConnection) -> bool:
    """True when an idle kept connection can no longer carry a request: the server closed it (readable with
    no request pending means end of file or a reset), as urllib3's `is_connection_dropped` decides
    (https://github.com/urllib3/urllib3/blob/main/src/urllib3/util/connection.py)."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)
