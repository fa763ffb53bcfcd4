"""argv -> Settings -> Supervisor; maps errors to exit codes. Nothing else."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import __version__, exitcodes
from . import log as rlog
from .handler import HandlerError, load
from .settings import DURATION_HELP, OPTIONS, SettingsError, closest, resolve, unknown_env
from .signals import SignalQueue

EPILOG = """\
signals to the supervisor:
  TERM, INT   graceful shutdown (a second one kills the workers)
  QUIT        immediate stop          HUP    reload code, rolling restart
  TTIN, TTOU  one worker more / fewer

exit codes:
""" + "\n".join(f"  {code:<3} {text}" for code, text in exitcodes.DESCRIPTIONS.items())


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        _fail(f"{message} (see rmqpool --help)")


def _fail(message: str) -> NoReturn:
    print(f"rmqpool: error: {message}", file=sys.stderr)
    raise SystemExit(exitcodes.USAGE)


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: `--work 2` would work today and break once another option starts
    # with --work; a typo is an error that names the closest option instead.
    parser = _Parser(
        prog="rmqpool", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        allow_abbrev=False,
        description="Run HANDLER (MODULE:FUNCTION) in a pool of worker processes consuming a "
                    "RabbitMQ queue. Every option can also be set with the environment "
                    f"variable shown; {DURATION_HELP}.")
    parser.add_argument("handler", nargs="?", metavar="MODULE:FUNCTION",
                        help="the handler to run (env: RMQPOOL_HANDLER)")
    parser.add_argument("--version", action="version", version=f"rmqpool {__version__}")
    for opt in OPTIONS:
        # Values stay text here: settings converts flags and the environment alike, so
        # both get the same errors.
        parser.add_argument(opt.flag, dest=opt.attr, default=None, metavar=opt.metavar,
                            help=f"{opt.help} [env: {opt.env}; default: {opt.default_text}]",
                            choices=opt.choices, action="append" if opt.repeatable else "store")
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    args, extra = parser.parse_known_args(argv)
    unknown = next((arg.split("=", 1)[0] for arg in extra if arg.startswith("-")), None)
    if unknown is not None:
        guess = closest(unknown, ["--help", "--version", *(opt.flag for opt in OPTIONS)])
        _fail(f"unknown option {unknown}" + (f"; did you mean {guess}?" if guess else "")
              + " (see rmqpool --help)")
    if extra:
        _fail(f"unexpected argument {extra[0]!r}: give one MODULE:FUNCTION (see rmqpool --help)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    for warning in unknown_env(os.environ):  # first: a misspelt variable may explain an error
        print(f"rmqpool: warning: {warning}", file=sys.stderr)
    args = _parse(build_parser(), argv)
    try:
        settings = resolve(args.handler, vars(args), os.environ)
    except SettingsError as exc:
        _fail(str(exc))
    rlog.setup(settings.log_level, settings.log_format, settings.library_log_level)
    signals = SignalQueue().install()  # a signal during a slow import waits for the loop
    try:
        handler = load(settings.handler)
    except HandlerError as exc:
        _fail(str(exc))
    from .supervisor import Supervisor  # after setup(): SPT_NOENV before setproctitle

    try:
        return Supervisor(settings, handler, signals).run()
    except SettingsError as exc:  # the metrics port cannot be bound
        _fail(str(exc))
