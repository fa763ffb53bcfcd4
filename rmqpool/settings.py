"""One frozen, picklable Settings object, built from flags > RMQPOOL_* env > defaults.

Every option is declared once in OPTIONS; the CLI, the environment lookup, the
--help text and the README table are all derived from it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import topology

ENV_PREFIX = "RMQPOOL_"
DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
DEFAULT_QUEUE = "rmqpool"
# The longest x-message-ttl the broker accepts (10 years, in seconds): the longest retry.
MAX_RETRY_DELAY = 315_360_000.0
# The broker's default consumer_timeout (delivery acknowledgement timeout) on 3.10.
BROKER_CONSUMER_TIMEOUT = 30 * 60.0


class SettingsError(ValueError):
    """A bad option value; the message names the option and the fix."""


class _Unparseable(ValueError):
    """Raised by an option's kind; the message says what the value should look like."""


@dataclass(frozen=True)
class Option:
    name: str  # the flag without dashes, e.g. "graceful-timeout"
    kind: Callable[[str], Any]
    default: Any
    help: str
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    repeatable: bool = False  # a flag per value; comma-separated in the environment
    shown_default: str | None = None  # the default as --help says it, when not the value

    @property
    def flag(self) -> str:
        return "--" + self.name

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper().replace("-", "_")

    @property
    def attr(self) -> str:
        return self.name.replace("-", "_")

    @property
    def default_text(self) -> str:
        if self.shown_default is not None:
            return self.shown_default
        unit = "s" if self.kind in (duration, whole_seconds, durations) else ""
        values = self.default if isinstance(self.default, tuple) else (self.default,)
        return ",".join(f"{v:g}{unit}" if isinstance(v, float | int) else str(v)
                        for v in values)


# -- kinds: text -> value; each raises _Unparseable with an example ----------------------
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}  # "ms" before "s" and "m"
DURATION_HELP = "durations take a unit: 1500ms, 30s, 2m, 1h; a bare number is seconds"


def duration(text: str) -> float:
    """Seconds from "1500ms", "30s", "2m", "1h" or a bare number of seconds."""
    text = text.strip()
    unit = next((unit for unit in _UNITS if text.endswith(unit)), "s")
    try:
        return float(text.removesuffix(unit)) * _UNITS[unit]
    except ValueError:
        raise _Unparseable("is not a duration: write e.g. 30s, 1500ms or 2m "
                           "(a bare number is seconds)") from None


def whole_seconds(text: str) -> int:
    """A duration the wire carries in whole seconds (the AMQP heartbeat)."""
    seconds = duration(text)
    if not math.isfinite(seconds) or not seconds.is_integer():
        raise _Unparseable("is not a whole number of seconds: AMQP negotiates the heartbeat "
                           "in seconds; write e.g. 30s, 2s, 1m or 0 (off)")
    return int(seconds)


def durations(text: str) -> tuple[float, ...]:
    try:
        return tuple(duration(part) for part in text.split(",") if part.strip())
    except _Unparseable:
        raise _Unparseable("is not a list of durations: write e.g. 1s,10s,1m "
                           "(a bare number is seconds)") from None


ArgValue = int | bool | str
INTEGER = re.compile(r"[-+]?\d+")
FORCE_STR = "str:"


def arg_value(text: str) -> ArgValue:
    """The typing rule of --queue-arg values: integers become ints, true/false bools,
    anything else a string; "str:" in front keeps the rest a string ("str:123")."""
    if text.startswith(FORCE_STR):
        return text[len(FORCE_STR):]
    if INTEGER.fullmatch(text):
        return int(text)
    if text in ("true", "false"):
        return text == "true"
    return text


def arg_text(value: ArgValue) -> str:
    """What to write for `value` so that arg_value() gives it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return value if arg_value(value) == value else FORCE_STR + value


def queue_arg(text: str) -> tuple[str, ArgValue]:
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise _Unparseable("is not KEY=VALUE: write e.g. x-max-length=10000")
    return key.strip(), arg_value(value.strip())


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

OPTIONS: tuple[Option, ...] = (
    Option("url", str, DEFAULT_URL,
           "AMQP URL of the broker (RABBITMQ_URL is honoured too)", "URL"),
    Option("queue", str, DEFAULT_QUEUE, "queue to consume", "NAME"),
    Option("workers", int, None, "worker processes", "N", shown_default="CPU count"),
    Option("prefetch", int, 10, "unacked messages the broker sends each worker", "N"),
    Option("concurrency", int, 1,
           "handlers in flight per worker (threads for sync handlers)", "N"),
    Option("exchange", str, "", "exchange to bind the queue to (empty: the default exchange)",
           "NAME"),
    Option("exchange-type", str, "direct", "type of --exchange",
           choices=("direct", "topic", "fanout", "headers")),
    Option("routing-key", str, (),
           "binding key of the queue to --exchange; repeatable (env: comma-separated)", "KEY",
           repeatable=True, shown_default="the queue name"),
    Option("queue-type", str, "classic", "type of the work queue", choices=("classic", "quorum")),
    Option("queue-arg", queue_arg, (),
           "an argument of the work queue's declaration, e.g. x-max-length=10000 (ints and "
           "true/false are typed, str:123 forces a string); repeatable (env: comma-separated)",
           "KEY=VALUE", repeatable=True, shown_default="none"),
    Option("graceful-timeout", duration, 30.0,
           "time in-flight handlers get to finish on shutdown", "DURATION"),
    Option("heartbeat", whole_seconds, 30,
           "AMQP heartbeat interval, whole seconds (0: off)", "DURATION"),
    Option("worker-timeout", duration, 30.0,
           "kill a worker whose event loop has not beaten for this long", "DURATION"),
    Option("max-retries", int, 3, "retries after the first attempt before dead-lettering", "N"),
    Option("retry-delays", durations, (1.0, 10.0, 60.0),
           "comma-separated delay tiers; retry n waits tier min(n, last)", "D,D,..."),
    Option("retry-jitter", float, 0.0,
           "spread each retry tier over [delay x (1 - jitter), delay] (4 queues per tier)",
           "FRACTION"),
    Option("time-limit", duration, 0.0,
           "hard limit per message (0: none)", "DURATION"),
    Option("max-worker-deaths", int, 3,
           "dead-letter a message after it killed or hung this many workers", "N"),
    Option("metrics-host", str, "0.0.0.0", "address /metrics, /healthz and /readyz bind to",
           "HOST"),
    Option("metrics-port", int, 9808, "port of /metrics, /healthz, /readyz (0: disabled)", "PORT"),
    Option("log-level", str, "info", "level of rmqpool's own log lines",
           choices=("debug", "info", "warning", "error")),
    Option("library-log-level", str, "critical",
           "level of aio-pika, aiormq and pamqp log lines (debug: every AMQP frame); "
           "below critical, every reconnect logs their tracebacks next to rmqpool's own line",
           choices=LOG_LEVELS),
    Option("log-format", str, "text", "log line format", choices=("text", "json")),
)
OPTIONS_BY_ATTR = {opt.attr: opt for opt in OPTIONS}


def _default(attr: str) -> Any:
    """Settings' defaults are the options' own: each default is written once, in OPTIONS."""
    return OPTIONS_BY_ATTR[attr].default


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***, for logs and reprs."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


@dataclass(frozen=True)
class Settings:
    handler: str
    url: str = field(default=_default("url"), repr=False)
    queue: str = _default("queue")
    workers: int = 1  # resolve() gives the CPU count (the option's default)
    prefetch: int = _default("prefetch")
    concurrency: int = _default("concurrency")
    exchange: str = _default("exchange")
    exchange_type: str = _default("exchange_type")
    routing_key: tuple[str, ...] = _default("routing_key")
    queue_type: str = _default("queue_type")
    queue_arg: tuple[tuple[str, ArgValue], ...] = _default("queue_arg")
    graceful_timeout: float = _default("graceful_timeout")
    heartbeat: int = _default("heartbeat")
    worker_timeout: float = _default("worker_timeout")
    max_retries: int = _default("max_retries")
    retry_delays: tuple[float, ...] = _default("retry_delays")
    retry_jitter: float = _default("retry_jitter")
    time_limit: float = _default("time_limit")
    max_worker_deaths: int = _default("max_worker_deaths")
    metrics_host: str = _default("metrics_host")
    metrics_port: int = _default("metrics_port")
    log_level: str = _default("log_level")
    library_log_level: str = _default("library_log_level")
    log_format: str = _default("log_format")

    def __repr__(self) -> str:  # the password never reaches a log line
        fields = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.repr
        )
        return f"Settings(url={redact_url(self.url)!r}, {fields})"

    @property
    def safe_url(self) -> str:
        return redact_url(self.url)

    @property
    def binding_keys(self) -> tuple[str, ...]:
        return self.routing_key or (self.queue,)

    @property
    def queue_arguments(self) -> dict[str, ArgValue]:
        """--queue-arg as the work queue's declare arguments."""
        return dict(self.queue_arg)

    def validate(self) -> Settings:
        _check_handler_spec(self.handler)
        check_url(self.url)
        if not self.queue or len(self.queue.encode()) > 255 or self.queue.startswith("amq."):
            raise SettingsError(
                f"--queue {self.queue!r} is not a usable queue name: give 1-255 bytes "
                "not starting with 'amq.'")
        _positive("workers", self.workers)
        _positive("prefetch", self.prefetch)
        _positive("concurrency", self.concurrency)
        if self.concurrency > self.prefetch:
            raise SettingsError(
                f"--concurrency {self.concurrency} is above --prefetch {self.prefetch}: "
                "handlers would wait for messages the broker never sends; raise --prefetch")
        for name in ("graceful_timeout", "worker_timeout"):
            _positive(name, getattr(self, name))
        if self.heartbeat < 0:
            raise SettingsError(f"--heartbeat must be >= 0 seconds (got {self.heartbeat})")
        if self.worker_timeout < 2:
            raise SettingsError(
                f"--worker-timeout {self.worker_timeout} is too short: workers beat once a "
                "second; use 2 seconds or more")
        if self.max_retries < 0:
            raise SettingsError(f"--max-retries must be >= 0 (got {self.max_retries})")
        if self.max_retries and not self.retry_delays:
            raise SettingsError("--retry-delays is empty: give at least one delay, e.g. 1s,10s,1m")
        if any(not d > 0 for d in self.retry_delays):  # `not >` also catches nan
            raise SettingsError(
                f"--retry-delays must all be > 0 seconds (got {_fmt(self.retry_delays)})")
        if any(not d <= MAX_RETRY_DELAY for d in self.retry_delays):
            raise SettingsError(
                f"--retry-delays {_fmt(self.retry_delays)}: the broker holds a message for "
                "at most 10 years (3650 days, its limit for a queue's x-message-ttl); use "
                "shorter delays")
        if not 0 <= self.retry_jitter < 1:
            raise SettingsError(f"--retry-jitter must be in [0, 1) (got {self.retry_jitter:g}); "
                                "0.2 spreads a 10 s retry over 8-10 s")
        if self.time_limit < 0:
            raise SettingsError(f"--time-limit must be >= 0 seconds (got {self.time_limit})")
        _check_queue_args(self)
        _positive("max_worker_deaths", self.max_worker_deaths)
        if not 0 <= self.metrics_port <= 65535:
            raise SettingsError(f"--metrics-port must be 0-65535 (got {self.metrics_port})")
        if self.exchange.startswith("amq.") and self.exchange not in _BUILTIN_EXCHANGES:
            raise SettingsError(f"--exchange {self.exchange!r}: names starting with 'amq.' "
                                "are reserved by the broker; choose another name")
        if self.routing_key and not self.exchange:
            raise SettingsError("--routing-key needs --exchange: the default exchange routes "
                                "by queue name only")
        for opt in OPTIONS:
            if opt.choices and getattr(self, opt.attr) not in opt.choices:
                raise SettingsError(
                    f"{opt.flag} {getattr(self, opt.attr)!r} is not one of "
                    f"{', '.join(opt.choices)}")
        return self


_BUILTIN_EXCHANGES = {"amq.direct", "amq.topic", "amq.fanout", "amq.headers", "amq.match"}
_SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def _fmt(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:g}" for v in values)


def _positive(attr: str, value: float) -> None:
    if not value > 0 or not math.isfinite(value):  # `not >` also catches nan
        opt = OPTIONS_BY_ATTR[attr]
        raise SettingsError(f"{opt.flag} must be > 0 (got {value:g}); "
                            f"set {opt.flag} or {opt.env} to a positive number")


def _check_queue_args(s: Settings) -> None:
    keys = [key for key, _ in s.queue_arg]
    own = topology.own_work_queue_args(s.queue_type)
    for key in keys:
        if keys.count(key) > 1:
            raise SettingsError(f"--queue-arg {key} is given {keys.count(key)} times; give it once")
        if key == "x-queue-type":
            raise SettingsError("--queue-arg x-queue-type: set the queue type with --queue-type "
                                "classic or --queue-type quorum")
        if key in own:
            raise SettingsError(
                f"--queue-arg {key}: rmqpool sets {key}={arg_text(own[key])} on {s.queue_type} "
                "work queues itself; drop it")


def _check_handler_spec(spec: str) -> None:
    if not _SPEC.match(spec):
        raise SettingsError(
            f"handler {spec!r} is not MODULE:FUNCTION; write it like handlers:handle "
            "(a module importable from the current directory, a colon, a function name)")


def check_url(url: str) -> None:
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise SettingsError(f"--url {redact_url(url)!r} is not a valid URL ({exc})") from None
    if parts.scheme not in ("amqp", "amqps"):
        raise SettingsError(
            f"--url {redact_url(url)!r} has scheme {parts.scheme or '(none)'!r}; "
            "use amqp://user:password@host:5672/vhost or amqps://")
    if not parts.hostname:
        raise SettingsError(f"--url {redact_url(url)!r} has no host; "
                            "use amqp://user:password@host:5672/vhost")


def _convert(opt: Option, raw: str, source: str) -> Any:
    """One value of `opt` from text; the error names `source`, the flag or the variable."""
    try:
        return opt.kind(raw)
    except _Unparseable as exc:
        raise SettingsError(f"{source} {raw!r} {exc}") from None
    except ValueError:
        names: dict[Any, str] = {int: "an integer", float: "a number"}
        raise SettingsError(f"{source} {raw!r} is not {names.get(opt.kind, 'valid')}") from None


def _from_flag(opt: Option, given: Any) -> Any:
    """Flags come as text from the CLI (one value per repeated flag); values that are
    already typed (Python callers, tests) pass through."""
    def one(value: Any) -> Any:
        return _convert(opt, value, opt.flag) if isinstance(value, str) else value

    return tuple(one(value) for value in given) if opt.repeatable else one(given)


def _from_env(opt: Option, raw: str) -> Any:
    if opt.repeatable:
        return tuple(_convert(opt, part.strip(), opt.env) for part in raw.split(",")
                     if part.strip())
    return _convert(opt, raw, opt.env)


KNOWN_ENV = (*(opt.env for opt in OPTIONS), "RMQPOOL_HANDLER")


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate most like `word` (a typo's correction), if any is close."""
    found = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


def unknown_env(env: Mapping[str, str]) -> list[str]:
    """A warning for each RMQPOOL_* variable that is no option (a typo is ignored
    otherwise), naming the closest one."""
    known = {name.removeprefix(ENV_PREFIX): name for name in KNOWN_ENV}
    warnings = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name in KNOWN_ENV:
            continue
        guess = closest(name.removeprefix(ENV_PREFIX), known)
        hint = f"did you mean {known[guess]}?" if guess else "see rmqpool --help for the options"
        warnings.append(f"{name} is not an rmqpool setting and is ignored; {hint}")
    return warnings


def resolve(handler: str | None, flags: Mapping[str, Any], env: Mapping[str, str],
            cpu_count: int | None = None) -> Settings:
    """Settings from flags (None = not given; text as argparse gives it, or typed values),
    the environment and defaults."""
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        given = flags.get(opt.attr)
        if given is not None and not (opt.repeatable and not given):
            values[opt.attr] = _from_flag(opt, given)
        elif opt.env in env:
            values[opt.attr] = _from_env(opt, env[opt.env])
        elif opt.attr == "url" and "RABBITMQ_URL" in env:
            values[opt.attr] = env["RABBITMQ_URL"]
        elif opt.default is not None:
            values[opt.attr] = opt.default
    values.setdefault("workers", cpu_count or os.cpu_count() or 1)
    spec = handler or env.get("RMQPOOL_HANDLER")
    if not spec:
        raise SettingsError("no handler given: run rmqpool MODULE:FUNCTION "
                            "(or set RMQPOOL_HANDLER), e.g. rmqpool examples.handlers:handle")
    return Settings(handler=spec, **values).validate()
