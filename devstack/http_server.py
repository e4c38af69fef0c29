"""The HTTP plumbing the local stand-ins share: read a request, hand it to a dispatch function, write
its answer. Each stand-in (dev host, Wave simulator, Key Vault simulator) only decides what to answer."""

from __future__ import annotations

import contextlib
import http.client
import select
import signal
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol, Self

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


class Served:
    """A stand-in's server on a thread of its own: start, stop, or a with-block around it."""

    server: ThreadingHTTPServer
    url: str

    def _listen(self, dispatch: Dispatch, host: str, port: int, name: str, *, certfile: Path | str | None = None,
                keyfile: Path | str | None = None) -> None:
        self.server = make_server(dispatch, host, port, certfile=certfile, keyfile=keyfile)
        self.url = f"{'https' if certfile else 'http'}://{host}:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name=name, daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Stoppable(Protocol):
    @property
    def url(self) -> str: ...

    def stop(self) -> None: ...


def serve_until_terminated(served: Stoppable, announce: Callable[[str], None]) -> int:
    """Keep a started stand-in serving until SIGTERM (how devstack/stack.py stops its processes) or Ctrl-C,
    then stop it; `announce` gets its URL once it listens. The exit code of a `python -m` entry point."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    announce(served.url)
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    served.stop()
    return 0
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
