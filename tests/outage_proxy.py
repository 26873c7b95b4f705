"""A TCP proxy for tests whose network fails: it forwards bytes between clients and a server on 127.0.0.1, and
can pause forwarding (connections stay open, nothing moves: a stalled link or a blackhole), cut every
connection at once (a server that died, or a link reset) and listen again on the same port.
"""
from __future__ import annotations

import select
import socket
import struct
import threading


class Proxy:
    """``Proxy(target_port)`` listens on ``port`` and forwards each connection to ``target_port``."""

    def __init__(self, target_port: int, port: int = 0):
        self.target_port = target_port
        self.port = port
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.connections = 0
        self.start()

    def start(self) -> "Proxy":
        """Listen (again, on the same port after ``kill``)."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._sockets.update((client, server))
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                self._flowing.wait()
                ready, _, _ = select.select([src], [], [], 0.1)
                if not ready:
                    continue
                self._flowing.wait()  # paused: what arrived stays in the kernel's buffers
                data = src.recv(65536)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                self._flowing.wait()
                dst.sendall(data)
        except (OSError, ValueError):  # ValueError: a socket ``kill`` closed meanwhile
            _reset(src)
            _reset(dst)

    def pause(self) -> None:
        """Forward nothing, accept new connections and forward nothing on them either: a stalled link."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def kill(self) -> None:
        """Stop listening and reset every connection: to the client, the server is gone."""
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread in accept(); close alone does not
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for s in sockets:
            _reset(s)
        self._flowing.set()

    def close(self) -> None:
        self.kill()


def _reset(sock: socket.socket) -> None:
    """Close with a reset, as a dead peer's kernel answers."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
