"""Load the user's MODULE:FUNCTION in the supervisor, before any fork.

Loading in the supervisor fails fast (exit 2, before a worker exists) and lets
forked workers share the imported code. SIGHUP reloads: the user's own modules
(those outside the standard library and site-packages) are dropped from
sys.modules and imported again; if the new code fails to import, the old
workers keep running.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_OWN_DIR = os.path.realpath(os.path.dirname(__file__)) + os.sep  # rmqpool itself


class HandlerError(Exception):
    """The handler cannot be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class Handler:
    spec: str
    fn: Callable[..., Any]
    is_async: bool
    wants_message: bool


def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    return tuple(os.path.realpath(d) for d in dirs)


def _is_user_module(module: Any, library_dirs: tuple[str, ...]) -> bool:
    path = getattr(module, "__file__", None)
    if not path:
        return False
    path = os.path.realpath(path)
    return not path.startswith((*library_dirs, _OWN_DIR))


def forget_user_modules() -> list[str]:
    """Drop the user's own modules from sys.modules so the next import reads the files."""
    library_dirs = _library_dirs()
    names = [name for name, mod in list(sys.modules.items())
             if _is_user_module(mod, library_dirs)]
    for name in names:
        del sys.modules[name]
    importlib.invalidate_caches()
    return names


def load(spec: str) -> Handler:
    module_name, _, attr_path = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise HandlerError(
                f"cannot import handler module {module_name!r}: no module named {exc.name!r}; "
                "run rmqpool from the directory that contains it or add it to PYTHONPATH"
            ) from None
        raise HandlerError(f"importing handler module {module_name!r} failed: {exc}; "
                           "install the missing package") from None
    except BaseException as exc:
        where = ""
        if isinstance(exc, SyntaxError):
            where = f" at {exc.filename}:{exc.lineno}"
        raise HandlerError(f"importing handler module {module_name!r} failed{where}: "
                           f"{type(exc).__name__}: {exc}") from None
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise HandlerError(f"module {module_name!r} has no attribute {attr_path!r}; "
                               f"check the name after the colon in {spec!r}") from None
    if not callable(obj):
        raise HandlerError(f"{spec!r} is a {type(obj).__name__}, not a function; "
                           "point rmqpool at a function that takes the message body")
    if inspect.isgeneratorfunction(obj) or inspect.isasyncgenfunction(obj):
        raise HandlerError(f"{spec!r} is a generator function; a handler must return "
                           "(or raise), not yield")
    return Handler(spec, obj, _is_async(obj), _wants_message(obj, spec))


def _is_async(fn: Callable[..., Any]) -> bool:
    # An object with an async __call__ counts too.
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        type(fn).__call__)


def _wants_message(fn: Callable[..., Any], spec: str) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    if not positional:
        raise HandlerError(f"{spec!r} takes no arguments; a handler takes the body "
                           "(and optionally a Message): def handle(body, message=None)")
    required = [p for p in positional if p.default is p.empty]
    if len(required) > 2:
        raise HandlerError(f"{spec!r} requires {len(required)} arguments; a handler takes "
                           "the body and optionally a Message")
    return len(positional) >= 2
