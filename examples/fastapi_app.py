"""A FastAPI app in front of an rmqpool pool: publish jobs, call a pool, report the broker.

    pip install -e '.[examples]'                                        # FastAPI, uvicorn
    rmqpool --queue jobs examples.handlers:handle &                     # does the jobs
    rmqpool --queue rpc --metrics-port 9809 examples.handlers:echo &    # answers /rpc
    uvicorn examples.fastapi_app:app --port 8000

    curl -i -X POST localhost:8000/jobs -H 'content-type: application/json' -d '{"n": 1}'
    curl -i -X POST localhost:8000/rpc -H 'content-type: application/json' -d '{"n": 1}'
    curl -i localhost:8000/healthz

- `POST /jobs` publishes the JSON object it is given to APP_JOBS_QUEUE (persistent,
  confirmed by the broker) and answers 202 with its message id.
- `POST /rpc` sends the JSON object to APP_RPC_QUEUE and answers the pool's reply.
- `GET /healthz` answers 200 `{"connected": true}` while the broker connection is up,
  503 `{"connected": false}` otherwise: a readiness probe, not a liveness one (a broker
  outage is no reason to restart the app).

One Publisher per process, opened by the lifespan and shared by every request: a
connection per request costs a TCP and AMQP handshake each time and runs into the
broker's connection limits.

Start-up connects with a bounded wait, then keeps trying: the lifespan waits up to
APP_BROKER_WAIT seconds for the first connection. If the broker is not reachable by
then, the app starts anyway; /healthz and every request answer 503 until a background
task, trying every CONNECT_RETRY seconds, has connected. From then on the connection is
robust: it reconnects by itself (every 5 s, aio-pika's default; `?reconnect_interval=1`
at the end of the URL for sooner), and a publish waits up to APP_BROKER_WAIT for it to
come back (and sends again what the broker had not confirmed) before answering 503.
A URL that cannot work at all (malformed) stops the start-up instead.

Errors become HTTP answers: Unroutable and other PublishErrors (no such queue, refused,
not confirmed) 503 with the error text; RemoteError (the pool dead-lettered the request)
502 with its reason, type and message; no reply within APP_RPC_TIMEOUT 504. A body that
is not a JSON object is refused by FastAPI with 422 before anything is published.

Configuration, from the environment (APP_*, not RMQPOOL_*: the pool warns about
RMQPOOL_* variables that are not its options, and the two often share an environment):

    RMQPOOL_URL or RABBITMQ_URL  the broker, as for the pool (guest on localhost)
    APP_JOBS_QUEUE               queue of POST /jobs (default: jobs)
    APP_RPC_QUEUE                queue of POST /rpc (default: rpc)
    APP_RPC_TIMEOUT              seconds POST /rpc waits for the reply (default: 10)
    APP_BROKER_WAIT              seconds to wait for a (re)connection (default: 10)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse

from rmqpool import Publisher, PublishError, RemoteError
from rmqpool.client import default_url
from rmqpool.settings import redact_url

log = logging.getLogger("examples.fastapi_app")

CONNECT_RETRY = 1.0  # seconds between connection attempts while the broker is unreachable


@dataclass(frozen=True)
class Config:
    url: str
    jobs_queue: str = "jobs"
    rpc_queue: str = "rpc"
    rpc_timeout: float = 10.0
    broker_wait: float = 10.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Config:
        return cls(url=default_url(env), jobs_queue=env.get("APP_JOBS_QUEUE", cls.jobs_queue),
                   rpc_queue=env.get("APP_RPC_QUEUE", cls.rpc_queue),
                   rpc_timeout=_seconds(env, "APP_RPC_TIMEOUT", cls.rpc_timeout),
                   broker_wait=_seconds(env, "APP_BROKER_WAIT", cls.broker_wait))


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    text = env.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{name}={text!r}: give a number of seconds above 0")
    return value


@dataclass
class Broker:
    """The app's one Publisher, and the task that makes its first connection."""

    publisher: Publisher
    connecting: asyncio.Task[None]

    def ready(self) -> Publisher:
        # Until the first connection is made, only `connecting` may call connect():
        # a request calling it too would open a second connection.
        if not self.connecting.done():
            where = redact_url(self.publisher.url)
            raise HTTPException(503, f"not connected to the broker at {where} (yet); "
                                     "try again later")
        self.connecting.result()  # a failure that is no lost connection is a bug: 500
        return self.publisher


async def _connect(publisher: Publisher) -> None:
    while True:
        try:
            await publisher.connect()
            return
        except (PublishError, ConnectionError) as exc:  # aio-pika's are ConnectionErrors
            log.warning("cannot connect to the broker (%s); trying again in %gs", exc,
                        CONNECT_RETRY)
        await asyncio.sleep(CONNECT_RETRY)


def _publisher(request: Request) -> Publisher:
    broker: Broker = request.app.state.broker
    return broker.ready()


Ready = Annotated[Publisher, Depends(_publisher)]


def create_app(config: Config | None = None) -> FastAPI:
    config = config or Config.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        publisher = Publisher(config.url, reconnect_timeout=config.broker_wait,
                              connection_name=f"rmqpool fastapi example pid {os.getpid()}")
        connecting = asyncio.create_task(_connect(publisher))
        await asyncio.wait([connecting], timeout=config.broker_wait)  # start anyway after
        if connecting.done():
            connecting.result()  # not a connection error (a malformed URL): do not start
        app.state.broker = Broker(publisher, connecting)
        try:
            yield
        finally:
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
            await publisher.close()

    app = FastAPI(title="rmqpool FastAPI example", lifespan=lifespan)

    @app.exception_handler(PublishError)  # Unroutable included
    async def publish_failed(request: Request, exc: PublishError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503)

    @app.exception_handler(RemoteError)
    async def remote_failed(request: Request, exc: RemoteError) -> JSONResponse:
        detail = {"reason": exc.reason, "type": exc.type, "message": exc.message}
        return JSONResponse({"detail": detail}, status_code=502)

    @app.post("/jobs", status_code=202)
    async def post_job(job: dict[str, Any], publisher: Ready) -> dict[str, str]:
        message_id = await publisher.publish(job, routing_key=config.jobs_queue)
        return {"message_id": message_id}

    @app.post("/rpc")
    async def post_rpc(body: dict[str, Any], publisher: Ready) -> Any:
        try:
            reply = await publisher.call(body, routing_key=config.rpc_queue,
                                         timeout=config.rpc_timeout)
        except TimeoutError as exc:
            raise HTTPException(504, str(exc)) from None
        if isinstance(reply, bytes):  # a reply that is not JSON, passed on as it is
            return Response(reply, media_type="application/octet-stream")
        return reply

    @app.get("/healthz")
    async def healthz(request: Request) -> JSONResponse:
        connected = request.app.state.broker.publisher.is_connected
        return JSONResponse({"connected": connected}, status_code=200 if connected else 503)

    return app


app = create_app()
