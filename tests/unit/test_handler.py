import sys
import textwrap

import pytest

from rmqpool.handler import HandlerError, forget_user_modules, load


@pytest.fixture
def module_dir(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    forget_user_modules()


def write(path, name, code):
    (path / f"{name}.py").write_text(textwrap.dedent(code))


def test_loads_sync_async_and_arity(module_dir):
    write(module_dir, "h_ok", """
        def one(body): pass
        def two(body, message): pass
        async def coro(body, message=None): pass
    """)
    assert not load("h_ok:one").wants_message and not load("h_ok:one").is_async
    assert load("h_ok:two").wants_message
    h = load("h_ok:coro")
    assert h.is_async and h.wants_message


@pytest.mark.parametrize(("code", "spec", "message"), [
    ("x = 1", "h_bad:missing", "has no attribute 'missing'"),
    ("x = 1", "h_bad:x", "is a int, not a function"),
    ("raise RuntimeError('boom at import')", "h_bad:f", "RuntimeError: boom at import"),
    ("def f(:\n  pass", "h_bad:f", "SyntaxError"),
    ("import no_such_dependency_zz", "h_bad:f", "No module named 'no_such_dependency_zz'; install"),
    ("def f(): pass", "h_bad:f", "takes no arguments"),
    ("def f(a, b, c): pass", "h_bad:f", "requires 3 arguments"),
    ("def f(body):\n  yield 1", "h_bad:f", "generator function"),
])
def test_bad_handlers(module_dir, code, spec, message):
    write(module_dir, "h_bad", code)
    sys.modules.pop("h_bad", None)
    with pytest.raises(HandlerError, match=message):
        load(spec)


def test_missing_module():
    with pytest.raises(HandlerError, match="cannot import handler module 'nope_zz_mod'"):
        load("nope_zz_mod:f")


def test_reload_reads_the_file_again(module_dir):
    write(module_dir, "h_rel", "def f(body): return 1")
    assert load("h_rel:f").fn(None) == 1
    write(module_dir, "h_rel", "def f(body): return 2")
    forget_user_modules()
    assert load("h_rel:f").fn(None) == 2


def test_reload_works_from_a_directory_named_rmqpool(tmp_path, monkeypatch):
    home = tmp_path / "rmqpool"
    home.mkdir()
    monkeypatch.syspath_prepend(str(home))
    write(home, "h_home", "def f(body): return 1")
    assert load("h_home:f").fn(None) == 1
    write(home, "h_home", "def f(body): return 2")
    forget_user_modules()
    assert load("h_home:f").fn(None) == 2
    forget_user_modules()


def test_the_package_exports_every_public_name_and_imports_lazily():
    import subprocess
    import sys

    import rmqpool

    assert set(rmqpool.__all__) == {*rmqpool._WHERE, "__version__"}
    for name in rmqpool.__all__:
        assert getattr(rmqpool, name) is not None
    code = "import sys, rmqpool; print('aio_pika' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr  # signals go in before the heavy part
