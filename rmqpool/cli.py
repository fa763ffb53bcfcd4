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
from .settings import OPTIONS, SettingsError, resolve

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
    parser = _Parser(
        prog="rmqpool", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Run HANDLER (MODULE:FUNCTION) in a pool of worker processes consuming a "
                    "RabbitMQ queue. Every option can also be set with the environment "
                    "variable shown.")
    parser.add_argument("handler", nargs="?", metavar="MODULE:FUNCTION",
                        help="the handler to run (env: RMQPOOL_HANDLER)")
    parser.add_argument("--version", action="version", version=f"rmqpool {__version__}")
    for opt in OPTIONS:
        default = opt.default
        if opt.repeatable:
            default = "the queue name"
        elif default is None:
            default = "CPU count"
        elif isinstance(default, tuple):
            default = ",".join(f"{v:g}" for v in default)
        help_text = f"{opt.help} [env: {opt.env}; default: {default}]"
        kind = str if opt.repeatable else opt.kind
        parser.add_argument(opt.flag, dest=opt.attr, type=kind, default=None, help=help_text,
                            metavar=opt.metavar, choices=opt.choices,
                            action="append" if opt.repeatable else "store")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = resolve(args.handler, vars(args), os.environ)
    except SettingsError as exc:
        _fail(str(exc))
    rlog.setup(settings.log_level, settings.log_format, settings.library_log_level)
    try:
        handler = load(settings.handler)
    except HandlerError as exc:
        _fail(str(exc))
    from .supervisor import Supervisor  # after setup(): SPT_NOENV before setproctitle

    try:
        return Supervisor(settings, handler).run()
    except SettingsError as exc:  # the metrics port cannot be bound
        _fail(str(exc))
