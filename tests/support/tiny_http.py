"""An HttpServer in a process of its own, for tests that change process-wide limits,
which they must never do to the pytest process:

    python -m tests.support.tiny_http NOFILE [-v]

lowers its open files limit to NOFILE, prints its port, and serves (as the supervisor
does: wait on fileno() for up to 0.25 s, then serve()) until its stdin closes, then
exits 0. A raise from serve() exits 1 with the traceback on stderr. Commands on
stdin, one byte each: "h" opens fds until none is left (prints "hogged"), "f" closes
them again (prints "freed").
"""

from __future__ import annotations

import logging
import os
import resource
import selectors
import sys

from rmqpool.http import HttpServer


def main() -> None:
    nofile = int(sys.argv[1])
    logging.basicConfig(level=logging.DEBUG if "-v" in sys.argv else logging.INFO,
                        stream=sys.stderr, format="%(levelname)s %(message)s")
    server = HttpServer("127.0.0.1", 0, lambda method, target: (200, "text/plain", b"ok\n"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    print(server.port, flush=True)
    selector = selectors.DefaultSelector()
    selector.register(server.fileno(), selectors.EVENT_READ)
    selector.register(0, selectors.EVENT_READ)
    hog: list[int] = []
    while True:
        if any(key.fd == 0 for key, _ in selector.select(0.25)):
            commands = os.read(0, 64)
            if not commands:
                break
            for command in commands.decode():
                if command == "h":
                    hog += _all_free_fds()
                    print("hogged", flush=True)
                elif command == "f":
                    for fd in hog:
                        os.close(fd)
                    hog.clear()
                    print("freed", flush=True)
        server.serve()
    server.close()


def _all_free_fds() -> list[int]:
    fds = []
    while True:
        try:
            fds.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            return fds


if __name__ == "__main__":
    main()
