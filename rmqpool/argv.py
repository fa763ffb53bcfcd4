"""The command line's parser rules, shared by `rmqpool` and its subcommands: no
abbreviations (`--work 2` would work today and break once another option starts with
--work), a typo is an error naming the closest flag, and every error is one line on
stderr, `PROG: error: ... (see PROG --help)`, with exit code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from . import exitcodes
from .settings import closest


class StrictParser(argparse.ArgumentParser):
    def __init__(self, prog: str, *, extra_hint: str, **kwargs: Any) -> None:
        """`extra_hint` says what to write instead of an unexpected positional argument."""
        super().__init__(prog=prog, allow_abbrev=False,
                         formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
        self.extra_hint = extra_hint

    def fail(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(exitcodes.USAGE)

    def error(self, message: str) -> NoReturn:
        self.fail(f"{message} (see {self.prog} --help)")

    def parse_strictly(self, argv: Sequence[str] | None) -> argparse.Namespace:
        args, extra = self.parse_known_args(argv)
        unknown = next((arg.split("=", 1)[0] for arg in extra if arg.startswith("-")), None)
        if unknown is not None:
            flags = [flag for flag in self._option_string_actions if flag.startswith("--")]
            guess = closest(unknown, flags)
            self.error(f"unknown option {unknown}" + (f"; did you mean {guess}?" if guess else ""))
        if extra:
            self.error(f"unexpected argument {extra[0]!r}: {self.extra_hint}")
        return args
