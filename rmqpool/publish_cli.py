"""`rmqpool publish` and `rmqpool call`: argv -> messages -> the broker -> a summary or
a reply, and an exit code (exitcodes.PUBLISH, exitcodes.CALL).

Runs in a shell or a script, never in the pool: one Publisher (confirms always) on
one uvloop loop. Every failure is one line on stderr naming the problem and the fix;
with --json, stdout has one JSON object a script can read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import uvloop
from tqdm import tqdm

from . import exitcodes, feed
from .argv import StrictParser
from .client import Publisher, default_url
from .exceptions import BrokerRefused, PublishError, RemoteError, Unroutable
from .log import LIBRARIES
from .settings import ArgValue, SettingsError, arg_value, check_url, duration

INT64 = range(-(2**63), 2**63)
INPUT_HELP = """\
bodies:
  --body JSON          one JSON value, sent --count times (default 1)
  --file F             JSON lines: one value per line, blank lines skipped; every line
                       is checked before the first message is sent (a bad one: exit 2,
                       nothing sent)
  stdin (neither)      JSON lines, streamed: each line is sent as it is read; a bad line
                       stops there (exit 2): the lines before it are published, none
                       after. --file - reads stdin the same way, also from a terminal
  --raw                send the text (each line) as bytes, no JSON, no content type
"""


class Failed(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# -- option types: text -> value; argparse turns their ArgumentTypeError into one line ---
def _header(text: str) -> tuple[str, ArgValue]:
    key, eq, raw = text.partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE: write e.g. tenant=acme")
    value = arg_value(raw.strip())
    if isinstance(value, int) and not isinstance(value, bool) and value not in INT64:
        raise argparse.ArgumentTypeError(f"{text!r}: {value} does not fit in 64 bits; "
                                         f"write {key}=str:{raw.strip()} to send it as text")
    return key.strip(), value


def _positive(kind: Callable[[str], float], what: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} above 0")
        return value

    return convert


# -- parsers ----------------------------------------------------------------------------
def _common(parser: StrictParser, json_help: str) -> None:
    parser.add_argument("--url", default=None, metavar="URL",
                        help="broker [env: RMQPOOL_URL, then RABBITMQ_URL; default: "
                             "amqp://guest:guest@localhost:5672/]")
    parser.add_argument("--exchange", default="", metavar="NAME",
                        help="exchange to publish to [default: the default exchange, which "
                             "routes by queue name]")
    parser.add_argument("--routing-key", metavar="KEY",
                        help="routing key (on the default exchange: the queue's name); "
                             "required")
    parser.add_argument("--header", type=_header, action="append", default=[],
                        metavar="KEY=VALUE",
                        help="a header; repeatable. Typed like --queue-arg: integers and "
                             "true/false are typed, str:123 forces a string")
    parser.add_argument("--body", metavar="JSON", help="the body, a JSON value")
    parser.add_argument("--raw", action="store_true",
                        help="send --body (or each line) as bytes, not JSON")
    parser.add_argument("--json", action="store_true", help=json_help)


def build_publish_parser() -> StrictParser:
    parser = StrictParser(
        "rmqpool publish", extra_hint="give the body with --body JSON or --file F",
        description="Publish messages with publisher confirms: a message is counted once the "
                    "broker confirmed it, and every message is mandatory (one no queue takes "
                    "is an error, not lost in silence). Shows a progress bar when stderr is a "
                    "terminal and ends with a summary line on stderr.",
        epilog=INPUT_HELP + "\nexit codes:\n" + exitcodes.describe(
            exitcodes.PUBLISH, ok="every message was confirmed"))
    _common(parser, "print the summary as one JSON object on stdout (also on failure, "
                    "with an \"error\")")
    parser.add_argument("--count", type=_positive(int, "a whole number"), default=None,
                        metavar="N", help="send --body N times [default: 1]")
    parser.add_argument("--file", metavar="F", help="JSON lines to send ('-': stdin)")
    parser.add_argument("--rate", type=_positive(float, "a number of messages a second"),
                        default=None, metavar="R",
                        help="at most R messages a second [default: as fast as confirmed]")
    parser.add_argument("--content-type", default=None, metavar="TYPE",
                        help="content type [default: application/json; with --raw: none]")
    parser.add_argument("--message-id", default=None, metavar="ID",
                        help="the message id of a single message [default: a uuid4]")
    parser.add_argument("--correlation-id", default=None, metavar="ID",
                        help="the correlation id of a single message")
    return parser


def build_call_parser() -> StrictParser:
    parser = StrictParser(
        "rmqpool call", extra_hint="give the body with --body JSON",
        description="Send one request (through RabbitMQ's direct reply-to) to a pool and "
                    "print its reply: the handler's return value, JSON pretty-printed, text "
                    "and bytes as they are. The request is mandatory and confirmed.",
        epilog="exit codes:\n" + exitcodes.describe(exitcodes.CALL, ok="the reply was printed"))
    _common(parser, "print the reply as one line of JSON (a reply that is no JSON: as a JSON "
                    "string); an error reply too, as {\"reason\", \"type\", \"message\"}")
    parser.add_argument("--timeout", type=_positive(duration, "a duration, e.g. 30s or 1500ms"),
                        default=30.0, metavar="DURATION",
                        help="how long to wait for the reply [default: 30s]")
    return parser


# -- running ------------------------------------------------------------------------------
@dataclass
class Tally:
    """What a publish did so far; read after an interrupt or a failure too."""

    exchange: str
    routing_key: str
    published: int = 0
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None

    @property
    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    @property
    def rate(self) -> float:
        return self.published / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        target = f"{self.exchange or '(default)'}/{self.routing_key}"
        rate = f"{self.rate:.0f}" if self.rate >= 100 else f"{self.rate:.3g}"
        return (f"published {self.published} message(s) to {target} in {self.seconds:.2f} s "
                f"({rate} msg/s)")

    def as_json(self, error: str | None = None) -> str:
        out: dict[str, Any] = {"published": self.published, "exchange": self.exchange,
                               "routing_key": self.routing_key,
                               "seconds": round(self.seconds, 3), "rate": round(self.rate, 1)}
        if error is not None:
            out["error"] = error
        return json.dumps(out)


def _url(args: argparse.Namespace, parser: StrictParser) -> str:
    url = args.url or default_url()
    try:
        check_url(url)
    except SettingsError as exc:
        parser.fail(str(exc))
    return url


def _check_publish(args: argparse.Namespace, parser: StrictParser) -> None:
    if args.body is not None and args.file is not None:
        parser.fail("give --body or --file, not both")
    if args.count is not None and args.body is None:
        parser.fail("--count repeats --body: give --body JSON (with --file or stdin every "
                    "line is one message)")
    single = args.body is not None and (args.count or 1) == 1
    for flag in ("message_id", "correlation_id"):
        if getattr(args, flag) is not None and not single:
            parser.fail(f"--{flag.replace('_', '-')} names one message: use it with --body "
                        "and no --count (many messages with one id are duplicates)")
    if args.body is None and args.file is None and sys.stdin.isatty():
        parser.fail("nothing to publish: give --body JSON, --file F, or pipe JSON lines into "
                    "stdin (--file - reads them from the terminal)")


def _check_common(args: argparse.Namespace, parser: StrictParser) -> None:
    if args.routing_key is None:  # checked here, not by argparse: a typo is named first
        parser.fail("no --routing-key: give the queue's name (or, with --exchange, the key "
                    "to route by)")
    if len(args.routing_key.encode()) > 255:
        parser.fail("--routing-key is longer than 255 bytes, the most AMQP carries")
    keys = [key for key, _ in args.header]
    for key in keys:
        if keys.count(key) > 1:
            parser.fail(f"--header {key} is given {keys.count(key)} times; give it once")


def _bodies(args: argparse.Namespace) -> feed.Bodies:
    if args.body is not None:
        return feed.repeated(feed.body(args.body, args.raw), args.count or 1)
    if args.file is not None and args.file != "-":
        return feed.from_file(args.file, args.raw)
    return feed.from_stream(sys.stdin.buffer, args.raw)


def _progress(total: int | None) -> tqdm[Any]:
    """A bar on stderr when it is a terminal; nothing otherwise."""
    terminal = sys.stderr.isatty()
    width = shutil.get_terminal_size().columns if terminal else 0
    # A terminal that reports 0 columns (some ptys) would hide tqdm's bar: assume 80.
    return tqdm(total=total, unit="msg", file=sys.stderr, disable=not terminal,
                dynamic_ncols=width > 0, ncols=None if width > 0 else 80)


async def _publish(args: argparse.Namespace, tally: Tally) -> None:
    bodies = _bodies(args)  # a bad --body or --file fails here, before connecting
    options: dict[str, Any] = {
        "routing_key": args.routing_key, "exchange": args.exchange,
        "headers": dict(args.header), "message_id": args.message_id,
        "correlation_id": args.correlation_id, "content_type": args.content_type}
    async with Publisher(args.url, connection_name=f"rmqpool publish pid {os.getpid()}") as pub:
        with _progress(bodies.total) as bar:
            window = feed.Window(lambda body: pub.publish(body, **options), pub.window,
                                 feed.Pace(args.rate), lambda: bar.update(1))
            tally.started = time.monotonic()
            try:
                await window.run(bodies.items)
            finally:
                tally.published, tally.ended = window.confirmed, time.monotonic()


async def _call(args: argparse.Namespace) -> Any:
    body = feed.body(args.body, args.raw)
    async with Publisher(args.url, connection_name=f"rmqpool call pid {os.getpid()}") as pub:
        return await pub.call(body, routing_key=args.routing_key, exchange=args.exchange,
                              timeout=args.timeout, headers=dict(args.header))


def _print_reply(reply: Any, as_json: bool) -> None:
    if as_json:
        text = reply.decode(errors="replace") if isinstance(reply, bytes) else reply
        print(json.dumps(text, ensure_ascii=False))
    elif isinstance(reply, bytes):
        sys.stdout.buffer.write(reply)
    elif isinstance(reply, str):
        print(reply)
    else:
        print(json.dumps(reply, ensure_ascii=False, indent=2))


# What went wrong -> the exit code; the first match counts (subclasses first).
EXIT_CODES: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], int], ...] = (
    (feed.BadInput, exitcodes.USAGE),
    (Unroutable, exitcodes.UNROUTABLE),
    (BrokerRefused, exitcodes.BROKER_REFUSED),
    (PublishError, exitcodes.PUBLISH_FAILED),
    (RemoteError, exitcodes.REMOTE_ERROR),
    (TimeoutError, exitcodes.CALL_TIMEOUT),
    ((KeyboardInterrupt, asyncio.CancelledError), exitcodes.INTERRUPTED),
)


def _failure(exc: BaseException, args: argparse.Namespace) -> Failed:
    """The one place where what went wrong becomes an exit code and a line."""
    code = next((code for kinds, code in EXIT_CODES if isinstance(exc, kinds)), None)
    if code is None:
        traceback.print_exception(exc)
        return Failed(exitcodes.INTERNAL, f"internal error ({type(exc).__name__}: {exc}); a "
                      "bug in rmqpool: please report it with the traceback above")
    return Failed(code, _explain(exc, code, args))


def _explain(exc: BaseException, code: int, args: argparse.Namespace) -> str:
    """The exception's own words, or the command line's where they name the fix better."""
    where = f"exchange {args.exchange!r}" if args.exchange else "the default exchange"
    if code == exitcodes.UNROUTABLE:
        return (f"no queue is bound to routing key {args.routing_key!r} on {where}: check "
                "--routing-key and --exchange, or declare and bind the queue (a pool "
                "declares its --queue at start)")
    if code == exitcodes.REMOTE_ERROR:
        return (f"the pool dead-lettered the request ({exc}); see the pool's log and its "
                "dead-letter queue, then fix the request or the handler")
    if code == exitcodes.CALL_TIMEOUT:
        return f"{exc}; wait longer with --timeout"
    if code == exitcodes.INTERRUPTED:
        return "interrupted: nothing more was sent"
    return str(exc)


def _run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """asyncio.run, with SIGTERM cancelling like SIGINT does: the `finally`s run (what
    was sent settles), then the exception comes out."""
    async def main() -> Any:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await coroutine

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def _quiet_libraries() -> None:
    """Their reconnect warnings are no use on a command line; rmqpool says what failed."""
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(levelname)s: %(message)s")
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _fail(parser: StrictParser, failed: Failed) -> int:
    print(f"{parser.prog}: error: {failed}", file=sys.stderr)
    return failed.code


def _parse(parser: StrictParser, argv: Sequence[str]) -> argparse.Namespace:
    """The options, with what both commands check checked."""
    args = parser.parse_strictly(argv)
    args.url = _url(args, parser)
    _check_common(args, parser)
    return args


def run_publish(argv: Sequence[str]) -> int:
    parser = build_publish_parser()
    args = _parse(parser, argv)
    _check_publish(args, parser)
    tally = Tally(args.exchange, args.routing_key)
    try:
        _run(_publish(args, tally))
    except (Exception, KeyboardInterrupt, asyncio.CancelledError) as exc:
        failed = _failure(exc, args)
        if args.json:
            print(tally.as_json(str(failed)))
        if tally.published:
            failed = Failed(failed.code, f"{failed} ({tally.published} message(s) were "
                            "confirmed)")
        return _fail(parser, failed)
    print(tally.as_json() if args.json else tally.line(), file=sys.stdout if args.json
          else sys.stderr)
    return exitcodes.OK


def run_call(argv: Sequence[str]) -> int:
    parser = build_call_parser()
    args = _parse(parser, argv)
    if args.body is None:
        parser.fail("call sends one request: give its body with --body JSON")
    try:
        reply = _run(_call(args))
    except (Exception, KeyboardInterrupt, asyncio.CancelledError) as exc:
        if args.json and isinstance(exc, RemoteError):
            print(json.dumps({"reason": exc.reason, "type": exc.type, "message": exc.message}))
        return _fail(parser, _failure(exc, args))
    _print_reply(reply, args.json)
    return exitcodes.OK


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {"publish": run_publish, "call": run_call}


def main(command: str, argv: Sequence[str]) -> int:
    _quiet_libraries()
    return COMMANDS[command](argv)

