"""A tiny threaded TCP proxy to simulate network trouble between a worker and
the broker (no asyncio, so it can be driven from any test, sync or async).

    proxy = TcpProxy("127.0.0.1", broker_port); proxy.start()
    url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
    proxy.cut()      # close every current connection, keep listening
    proxy.pause()    # new connections are accepted and reset at once
    proxy.resume()
    proxy.close()

Each accepted connection gets two pump threads (blocking sockets, so flow
control is TCP's own); one selector thread accepts.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
import time
import urllib.parse

__all__ = ["TcpProxy"]


def _hard_close(sock: socket.socket, reset: bool) -> None:
    # shutdown() also wakes a pump thread blocked in recv() on this socket
    # (close() alone would not).
    with contextlib.suppress(OSError):
        if reset:  # SO_LINGER 0: close() sends RST instead of FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.shutdown(socket.SHUT_RD)
        else:
            sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, proxy: TcpProxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.blackholed = False
        self._lock = threading.Lock()
        self._closed = False
        self._done = 0
        self.threads = [
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True,
                             name=f"TcpProxy:{proxy.port}:c->u"),
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True,
                             name=f"TcpProxy:{proxy.port}:u->c"),
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if self.blackholed:
                    continue  # silently drop: peers see a dead, open connection
                dst.sendall(data)
        except OSError:
            pass
        with self._lock:
            self._done += 1
            both = self._done == 2
        if both:
            self.close()
        else:
            # Propagate EOF to the other side; it will finish its pump then.
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self, reset: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _hard_close(self.client, reset)
        _hard_close(self.upstream, reset)
        self.proxy._forget(self)


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1",
                 connect_timeout: float = 5.0) -> None:
        self.target = (target_host, target_port)
        self.connect_timeout = connect_timeout
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((listen_host, 0))
        self._listener.listen(128)
        self._listener.setblocking(False)
        self.host = listen_host
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._paused = False
        self._closing = False
        self._thread: threading.Thread | None = None
        self.accepted = 0  # connections forwarded upstream, ever
        self.refused = 0  # connections reset because paused / upstream down

    # -- public API -------------------------------------------------------

    def url(self, user: str = "guest", password: str = "guest", vhost: str = "/") -> str:
        """An AMQP URL that goes through the proxy."""
        path = "" if vhost == "/" else urllib.parse.quote(vhost, safe="")
        return f"amqp://{user}:{password}@{self.host}:{self.port}/{path}"

    @property
    def active(self) -> int:
        """Number of currently open forwarded connections."""
        with self._lock:
            return len(self._links)

    @property
    def paused(self) -> bool:
        return self._paused

    def start(self) -> TcpProxy:
        if self._thread is None:
            self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                            name=f"TcpProxy:{self.port}:accept")
            self._thread.start()
        return self

    def cut(self, reset: bool = False) -> int:
        """Close all current connections (FIN, or RST if reset); keep listening.
        Returns how many connections were cut."""
        with self._lock:
            links = list(self._links)
        for link in links:
            link.close(reset=reset)
        return len(links)

    def blackhole(self) -> None:
        """Keep current connections open but silently drop all their traffic
        (a network partition: only heartbeats/timeouts can detect it)."""
        with self._lock:
            for link in self._links:
                link.blackholed = True

    def pause(self) -> None:
        """Reset new connections at once until resume(); existing ones are
        kept (call cut() too to drop them)."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    def wait_active(self, n: int, timeout: float = 30) -> None:
        """Block until exactly n connections are open (or raise TimeoutError)."""
        deadline = time.monotonic() + timeout
        while self.active != n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"proxy has {self.active} connections, wanted {n}")
            time.sleep(0.02)

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.cut()
        with self._lock:
            links = list(self._links)
        for link in links:
            for t in link.threads:
                t.join(timeout=5)
        for s in (self._listener, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                s.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<TcpProxy 127.0.0.1:{self.port} -> {self.target[0]}:{self.target[1]} "
                f"active={self.active} paused={self._paused}>")

    # -- internals --------------------------------------------------------

    def _forget(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._closing:
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r or self._closing:
                        return
                    try:
                        client, _addr = self._listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        return
                    self._handle(client)

    def _handle(self, client: socket.socket) -> None:
        client.setblocking(True)
        if self._paused:
            self.refused += 1
            _hard_close(client, reset=True)
            return
        try:
            upstream = socket.create_connection(self.target, timeout=self.connect_timeout)
        except OSError:
            self.refused += 1
            _hard_close(client, reset=True)  # like the broker being down
            return
        upstream.settimeout(None)
        for s in (client, upstream):
            with contextlib.suppress(OSError):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link(self, client, upstream)
        with self._lock:
            if self._closing:
                _hard_close(client, True)
                _hard_close(upstream, True)
                return
            self._links.add(link)
            self.accepted += 1
        link.start()
