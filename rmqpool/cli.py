"""argv -> Settings -> Supervisor; maps errors to exit codes. Nothing else."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from . import __version__, exitcodes
from . import log as rlog
from .argv import StrictParser
from .handler import HandlerError, load
from .settings import DURATION_HELP, OPTIONS, SettingsError, resolve, unknown_env
from .signals import SignalQueue

SUBCOMMANDS = ("publish", "call")  # never a handler: a handler spec has a colon

EPILOG = """\
signals to the supervisor:
  TERM, INT   graceful shutdown (a second one kills the workers)
  QUIT        immediate stop          HUP    reload code, rolling restart
  TTIN, TTOU  one worker more / fewer

exit codes:
""" + exitcodes.describe(exitcodes.POOL) + """

putting messages in (each has its own --help):
  rmqpool publish --routing-key KEY --body JSON   publish with confirms (or JSON lines)
  rmqpool call --routing-key KEY --body JSON      send one request, print the reply
"""


def build_parser() -> StrictParser:
    parser = StrictParser(
        "rmqpool", epilog=EPILOG, extra_hint="give one MODULE:FUNCTION",
        description="Run HANDLER (MODULE:FUNCTION) in a pool of worker processes consuming a "
                    "RabbitMQ queue. Every option can also be set with the environment "
                    f"variable shown; {DURATION_HELP}. Subcommands publish and call put "
                    "messages in (see below).")
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        from . import publish_cli  # only here: the pool has no use for tqdm

        return publish_cli.main(argv[0], argv[1:])
    signals = SignalQueue().install()  # first: a signal during start-up waits for the loop
    for warning in unknown_env(os.environ):  # first: a misspelt variable may explain an error
        print(f"rmqpool: warning: {warning}", file=sys.stderr)
    parser = build_parser()
    args = parser.parse_strictly(argv)
    try:
        settings = resolve(args.handler, vars(args), os.environ)
    except SettingsError as exc:
        parser.fail(str(exc))
    rlog.setup(settings.log_level, settings.log_format, settings.library_log_level)
    try:
        handler = load(settings.handler)
    except HandlerError as exc:
        parser.fail(str(exc))
    from .supervisor import Supervisor  # after setup(): SPT_NOENV before setproctitle

    try:
        return Supervisor(settings, handler, signals).run()
    except SettingsError as exc:  # the metrics port cannot be bound
        parser.fail(str(exc))
