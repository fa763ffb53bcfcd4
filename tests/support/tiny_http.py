"""An HttpServer in a process of its own, for tests that change process-wide limits,
which they must never do to the pytest process:

    python -m tests.support.tiny_http NOFILE

lowers its open files limit to NOFILE, prints its port, and serves (as the supervisor
does: wait on fileno() for up to 0.25 s, then serve()) until its stdin closes, then
exits 0. A raise from serve() exits 1 with the traceback on stderr.
"""

from __future__ import annotations

import logging
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
    selector.register(sys.stdin, selectors.EVENT_READ)
    while not any(key.fileobj is sys.stdin for key, _ in selector.select(0.25)):
        server.serve()
    server.close()


if __name__ == "__main__":
    main()
