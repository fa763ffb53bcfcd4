"""Exit codes are API: scripts, systemd and Kubernetes act on them.

The supervisor exits with one of these. A worker that reports a fatal error
over the control channel (bad credentials, topology clash) exits with the same
code and stops the pool with it; any other unexpected exit, whatever its code,
is a crash and the slot is restarted with backoff.
"""

OK = 0  # graceful shutdown: every in-flight message finished and acked
FORCED = 1  # forced stop (second signal, SIGQUIT, graceful timeout): unfinished messages requeued
USAGE = 2  # bad option or handler spec; nothing was started
BROKER_REFUSED = 3  # the broker refused the credentials or the virtual host
TOPOLOGY = 4  # a queue/exchange exists with other arguments (406 PRECONDITION_FAILED)
INTERNAL = 70  # a bug in rmqpool (EX_SOFTWARE)

DESCRIPTIONS = {
    OK: "graceful shutdown",
    FORCED: "forced shutdown; unfinished messages were returned to the queue",
    USAGE: "bad option or handler",
    BROKER_REFUSED: "broker refused credentials or virtual host",
    TOPOLOGY: "queue or exchange exists with different arguments",
    INTERNAL: "internal error",
}
