"""Exit codes are API: scripts, systemd and Kubernetes act on them.

The supervisor exits with one of POOL. A worker that reports a fatal error over
the control channel (bad credentials, topology clash) exits with the same code and
stops the pool with it; any other unexpected exit, whatever its code, is a crash
and the slot is restarted with backoff. `rmqpool publish` exits with one of
PUBLISH, `rmqpool call` with one of CALL.
"""

OK = 0  # graceful shutdown: every in-flight message finished and acked; publish/call: done
FORCED = 1  # forced stop (second signal, SIGQUIT, graceful timeout): unfinished messages requeued
USAGE = 2  # bad option, handler spec or input; nothing was started (publish: nothing after it)
BROKER_REFUSED = 3  # the broker refused the credentials or the virtual host
TOPOLOGY = 4  # a queue/exchange exists with other arguments (406 PRECONDITION_FAILED)
UNROUTABLE = 5  # publish/call: no queue is bound to the routing key (mandatory)
PUBLISH_FAILED = 6  # publish/call: nacked, no such exchange, no confirm in time, no broker
REMOTE_ERROR = 7  # call: the pool dead-lettered the request and replied with the error
CALL_TIMEOUT = 8  # call: no reply within --timeout
INTERNAL = 70  # a bug in rmqpool (EX_SOFTWARE)
INTERRUPTED = 130  # publish/call: stopped by SIGINT or SIGTERM (128 + SIGINT, as shells do)

DESCRIPTIONS = {
    OK: "graceful shutdown",
    FORCED: "forced shutdown; unfinished messages were returned to the queue",
    USAGE: "bad option, handler or input",
    BROKER_REFUSED: "broker refused credentials or virtual host",
    TOPOLOGY: "queue or exchange exists with different arguments",
    UNROUTABLE: "unroutable: no queue is bound to the routing key",
    PUBLISH_FAILED: "not published: nacked, no such exchange, no confirm in time or no broker",
    REMOTE_ERROR: "the pool dead-lettered the request (an error reply)",
    CALL_TIMEOUT: "no reply within --timeout",
    INTERNAL: "internal error",
    INTERRUPTED: "interrupted (SIGINT, SIGTERM); what was sent before is settled",
}

POOL = (OK, FORCED, USAGE, BROKER_REFUSED, TOPOLOGY, INTERNAL)
PUBLISH = (OK, USAGE, BROKER_REFUSED, UNROUTABLE, PUBLISH_FAILED, INTERNAL, INTERRUPTED)
CALL = (OK, USAGE, BROKER_REFUSED, UNROUTABLE, PUBLISH_FAILED, REMOTE_ERROR, CALL_TIMEOUT,
        INTERNAL, INTERRUPTED)


def describe(codes: tuple[int, ...], ok: str = DESCRIPTIONS[OK]) -> str:
    """The lines of an --help epilog listing `codes`; `ok` says what success is."""
    return "\n".join(f"  {code:<3} {ok if code == OK else DESCRIPTIONS[code]}"
                     for code in codes)
