"""Signals to the supervisor: the handlers only record them (a wakeup fd wakes the loop).

Installed by the CLI before the handler module is imported, so a signal that arrives
while a slow import runs (SIGTERM from an orchestrator, SIGHUP from a deploy) waits
for the supervisor's loop instead of taking its default action.
"""

from __future__ import annotations

import os
import signal
from collections import deque
from typing import Any

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
           signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)


class SignalQueue:
    def __init__(self) -> None:
        self.pending: deque[int] = deque()
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def install(self) -> SignalQueue:
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for sig in HANDLED:
            signal.signal(sig, self._record)
        return self

    def _record(self, signum: int, _frame: Any) -> None:
        self.pending.append(signum)  # NO logging, no work: the loop does it

    def fileno(self) -> int:
        return self._read

    def fds(self) -> list[int]:
        """Every fd it holds (closed in forked workers)."""
        return [self._read, self._write]

    def clear_wakeup(self) -> None:
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass

    def pop_all(self) -> list[int]:
        out = []
        while self.pending:
            out.append(self.pending.popleft())
        return out
