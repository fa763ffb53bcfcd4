"""Example handlers. Run one with:  rmqpool --workers 2 --queue demo examples.handlers:handle"""

import hashlib
import logging

import rmqpool

log = logging.getLogger("examples")


def handle(body, message: rmqpool.Message):
    """A CPU-heavy sync handler: runs in a worker thread, heartbeats keep flowing."""
    if isinstance(body, dict) and body.get("fail"):
        raise ValueError(f"asked to fail: {body['fail']}")
    data = repr(body).encode()
    for _ in range(2000):
        data = hashlib.sha256(data).digest()
    log.info("handled %s (attempt %d): %s", message.message_id, message.attempt, data.hex()[:16])


async def handle_async(body):
    """An async handler: runs on the worker's event loop."""
    log.info("handled %r", body)


def echo(body, message: rmqpool.Message):
    """An RPC handler (examples/fastapi_app.py calls it): what it returns is the reply.
    {"fail": "..."} fails it, so the caller gets an error reply once it is dead-lettered."""
    if isinstance(body, dict) and body.get("fail"):
        raise ValueError(f"asked to fail: {body['fail']}")
    return {"echo": body, "attempt": message.attempt}
