"""A real HTTP proxy for tests, on a free 127.0.0.1 port: ``CONNECT host:port`` tunnels (https) and
absolute-form requests (``GET http://host:port/path``, plain http), as a site's forward proxy takes them.

It records each request head it is sent (``heads``), and with ``credentials`` (user, password) answers
407 to a request without them, as an authenticating proxy does.
"""
from __future__ import annotations

import base64
import socket
import socketserver
import threading
from urllib.parse import quote, urlsplit

from netutil import free_port


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(socketserver.StreamRequestHandler):
    server: "_Server"

    def handle(self) -> None:
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            byte = self.connection.recv(1)
            if not byte:
                return
            head += byte
        lines = head.decode("latin-1").split("\r\n")
        self.server.owner.heads.append(head.decode("latin-1"))
        method, target, version = lines[0].split(" ", 2)
        fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        wanted = self.server.owner.credentials
        if wanted and fields.get("proxy-authorization") != "Basic " + base64.b64encode(":".join(wanted).encode()).decode():
            self.connection.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                                    b"Proxy-Authenticate: Basic realm=\"test\"\r\nContent-Length: 0\r\n\r\n")
            return
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            upstream = socket.create_connection((host.strip("[]"), int(port)))
            self.connection.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            url = urlsplit(target)
            upstream = socket.create_connection((url.hostname, url.port or 80))
            path = url.path + (f"?{url.query}" if url.query else "")
            kept = [ln for ln in lines[1:] if ln and not ln.lower().startswith("proxy-")]
            upstream.sendall(f"{method} {path} {version}\r\n".encode("latin-1")
                             + "".join(f"{ln}\r\n" for ln in kept).encode("latin-1") + b"\r\n")
        back = threading.Thread(target=_pipe, args=(upstream, self.connection), daemon=True)
        back.start()
        _pipe(self.connection, upstream)
        back.join()
        upstream.close()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: "HTTPProxy"


class HTTPProxy:
    """A forward proxy; ``url`` is what HTTP(S)_PROXY is set to (with the credentials, when it has some)."""

    def __init__(self, credentials: tuple[str, str] | None = None) -> None:
        self.credentials = credentials
        self.heads: list[str] = []
        self.port = free_port()
        self._server = _Server(("127.0.0.1", self.port), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        user = f"{quote(self.credentials[0])}:{quote(self.credentials[1])}@" if self.credentials else ""
        return f"http://{user}127.0.0.1:{self.port}"

    def __enter__(self) -> "HTTPProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
