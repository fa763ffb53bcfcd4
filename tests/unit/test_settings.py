import pickle
import re

import pytest

from rmqpool.settings import (
    OPTIONS,
    Settings,
    SettingsError,
    arg_text,
    arg_value,
    redact_url,
    resolve,
    unknown_env,
)

H = "examples.handlers:handle"


def test_defaults():
    s = resolve(H, {}, {}, cpu_count=3)
    assert s.workers == 3 and s.queue == "rmqpool" and s.prefetch == 10
    assert s.url == "amqp://guest:guest@localhost:5672/"
    assert s.binding_keys == ("rmqpool",)


def test_flag_beats_env_beats_default():
    env = {"RMQPOOL_WORKERS": "5", "RMQPOOL_QUEUE": "from-env"}
    assert resolve(H, {}, env).workers == 5
    assert resolve(H, {"workers": 2}, env).workers == 2
    assert resolve(H, {"workers": 2}, env).queue == "from-env"


def test_rabbitmq_url_is_honoured_below_rmqpool_url():
    assert resolve(H, {}, {"RABBITMQ_URL": "amqp://a:b@h/"}).url == "amqp://a:b@h/"
    env = {"RABBITMQ_URL": "amqp://a:b@h/", "RMQPOOL_URL": "amqp://c:d@i/"}
    assert resolve(H, {}, env).url == "amqp://c:d@i/"


def test_env_lists_and_handler():
    env = {"RMQPOOL_ROUTING_KEY": "a.*, b.#", "RMQPOOL_EXCHANGE": "ex",
           "RMQPOOL_RETRY_DELAYS": "0.5,2", "RMQPOOL_HANDLER": H}
    s = resolve(None, {}, env)
    assert s.routing_key == ("a.*", "b.#") and s.retry_delays == (0.5, 2.0)
    assert s.handler == H


@pytest.mark.parametrize(("flags", "env", "message"), [
    ({"workers": 0}, {}, "--workers must be > 0"),
    ({}, {"RMQPOOL_WORKERS": "0"}, "--workers must be > 0"),
    ({}, {"RMQPOOL_WORKERS": "many"}, "RMQPOOL_WORKERS 'many' is not an integer"),
    ({"prefetch": -1}, {}, "--prefetch must be > 0"),
    ({"queue_type": "stream"}, {}, "--queue-type 'stream' is not one of classic, quorum"),
    ({"url": "http://x/"}, {}, "scheme 'http'"),
    ({"url": "amqp://u:secret@h:99999/"}, {}, "not a valid URL"),
    ({"concurrency": 20, "prefetch": 10}, {}, "raise --prefetch"),
    ({"routing_key": ["a"]}, {}, "--routing-key needs --exchange"),
    ({"retry_delays": (0.0,)}, {}, "--retry-delays must all be > 0"),
    ({"retry_delays": "nan"}, {}, "--retry-delays must all be > 0"),
    ({"retry_delays": "1s,100000h"}, {}, "--retry-delays 1,3.6e+08: the broker holds a message "
                                         "for at most 10 years"),
    ({"worker_timeout": 1}, {}, "--worker-timeout 1"),
    ({"retry_jitter": 1.0}, {}, "--retry-jitter must be in"),
    ({"graceful_timeout": float("nan")}, {}, "--graceful-timeout must be > 0"),
    ({}, {"RMQPOOL_WORKER_TIMEOUT": "nan"}, "--worker-timeout must be > 0"),
    ({"queue": "amq.x"}, {}, "not a usable queue name"),
])
def test_bad_values_name_the_option(flags, env, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        resolve(H, flags, env)


@pytest.mark.parametrize("spec", ["nocolon", "a:b:c", ":f", "m:", "1mod:f", "m:f-g"])
def test_bad_handler_spec(spec):
    with pytest.raises(SettingsError, match="is not MODULE:FUNCTION"):
        resolve(spec, {}, {})


def test_missing_handler():
    with pytest.raises(SettingsError, match="no handler given"):
        resolve(None, {}, {})


def test_password_never_in_repr():
    s = resolve(H, {"url": "amqp://user:s3cret@host:5672/vh"}, {})
    assert "s3cret" not in repr(s) and "s3cret" not in str(s)
    assert "user:***@host:5672" in repr(s)
    assert s.safe_url == "amqp://user:***@host:5672/vh"
    assert redact_url("amqp://host/") == "amqp://host/"


def test_settings_are_frozen_and_picklable():
    s = resolve(H, {}, {})
    assert pickle.loads(pickle.dumps(s)) == s
    with pytest.raises(AttributeError):
        s.workers = 9  # type: ignore[misc]


def test_every_option_is_a_settings_field():
    fields = set(Settings.__dataclass_fields__)
    assert {opt.attr for opt in OPTIONS} <= fields


# -- durations (flags come as text from argparse; the environment is text) ------------------
@pytest.mark.parametrize(("text", "seconds"), [
    ("1500ms", 1.5), ("30s", 30.0), ("2m", 120.0), ("1h", 3600.0), ("1.5", 1.5), ("10", 10.0),
    (" 250 ms ", 0.25),
])
def test_durations_take_units_everywhere(text, seconds):
    from_flag = resolve(H, {"graceful_timeout": text, "time_limit": text}, {})
    assert from_flag.graceful_timeout == seconds and from_flag.time_limit == seconds
    from_env = resolve(H, {}, {"RMQPOOL_GRACEFUL_TIMEOUT": text, "RMQPOOL_TIME_LIMIT": text})
    assert from_env.graceful_timeout == seconds and from_env.time_limit == seconds


def test_retry_delays_and_worker_timeout_take_units():
    s = resolve(H, {"retry_delays": "1s,10s,1m", "worker_timeout": "1m"}, {})
    assert s.retry_delays == (1.0, 10.0, 60.0) and s.worker_timeout == 60.0
    env = {"RMQPOOL_RETRY_DELAYS": "500ms, 2s", "RMQPOOL_WORKER_TIMEOUT": "90s"}
    s = resolve(H, {}, env)
    assert s.retry_delays == (0.5, 2.0) and s.worker_timeout == 90.0


@pytest.mark.parametrize(("text", "seconds"), [("2000ms", 2), ("30s", 30), ("1m", 60), ("5", 5),
                                               ("0", 0)])
def test_heartbeat_is_whole_seconds(text, seconds):
    s = resolve(H, {"heartbeat": text}, {})
    assert s.heartbeat == seconds and isinstance(s.heartbeat, int)


@pytest.mark.parametrize(("flags", "env", "message"), [
    ({"retry_delays": "1s,10x"}, {}, "--retry-delays '1s,10x' is not a list of durations: "
                                     "write e.g. 1s,10s,1m"),
    ({}, {"RMQPOOL_RETRY_DELAYS": "1,soon"}, "RMQPOOL_RETRY_DELAYS '1,soon' is not a list"),
    ({"graceful_timeout": "soon"}, {}, "--graceful-timeout 'soon' is not a duration: "
                                       "write e.g. 30s, 1500ms or 2m"),
    ({}, {"RMQPOOL_TIME_LIMIT": "5 min"}, "RMQPOOL_TIME_LIMIT '5 min' is not a duration"),
    ({"heartbeat": "1500ms"}, {}, "--heartbeat '1500ms' is not a whole number of seconds"),
    ({}, {"RMQPOOL_HEARTBEAT": "1.5"}, "RMQPOOL_HEARTBEAT '1.5' is not a whole number"),
    ({"worker_timeout": "1500ms"}, {}, "--worker-timeout 1.5 is too short"),
    ({"graceful_timeout": "-1s"}, {}, "--graceful-timeout must be > 0"),
])
def test_bad_durations_name_the_option_and_give_an_example(flags, env, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        resolve(H, flags, env)


# -- --queue-arg -----------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "value"), [
    ("10000", 10000), ("-1", -1), ("true", True), ("false", False), ("lazy", "lazy"),
    ("", ""), ("1.5", "1.5"), ("str:123", "123"), ("str:true", "true"), ("str:", ""),
    ("True", "True"), ("a=b", "a=b"),
])
def test_queue_arg_values_are_typed(text, value):
    assert arg_value(text) == value and type(arg_value(text)) is type(value)
    # arg_text writes what gives the value back (the 406 messages use it).
    assert arg_value(arg_text(value)) == value and type(arg_value(arg_text(value))) is type(value)


def test_queue_args_from_flags_and_env():
    flags = {"queue_arg": ["x-max-length=10000", "x-single-active-consumer=true",
                           "x-dead-letter-exchange=", "x-note=str:42"]}
    s = resolve(H, flags, {})
    assert s.queue_arguments == {"x-max-length": 10000, "x-single-active-consumer": True,
                                 "x-dead-letter-exchange": "", "x-note": "42"}
    env = {"RMQPOOL_QUEUE_ARG": "x-max-length=5, x-overflow=drop-head"}
    assert resolve(H, {}, env).queue_arguments == {"x-max-length": 5, "x-overflow": "drop-head"}
    assert resolve(H, flags, env).queue_arguments["x-max-length"] == 10000  # flags win
    assert resolve(H, {}, {}).queue_arguments == {}


@pytest.mark.parametrize(("flags", "env", "message"), [
    ({"queue_arg": ["x-max-length"]}, {}, "--queue-arg 'x-max-length' is not KEY=VALUE: "
                                          "write e.g. x-max-length=10000"),
    ({"queue_arg": ["=5"]}, {}, "is not KEY=VALUE"),
    ({}, {"RMQPOOL_QUEUE_ARG": "x-max-length=5,oops"}, "RMQPOOL_QUEUE_ARG 'oops' is not KEY=VALUE"),
    ({"queue_arg": ["x-queue-type=quorum"]}, {}, "--queue-arg x-queue-type: set the queue type "
                                                 "with --queue-type"),
    ({"queue_arg": ["x-delivery-limit=5"], "queue_type": "quorum"}, {},
     "--queue-arg x-delivery-limit: rmqpool sets x-delivery-limit=20 on quorum work queues"),
    ({"queue_arg": ["x-dead-letter-exchange=dlx"], "queue_type": "quorum"}, {},
     "rmqpool sets x-dead-letter-exchange= on quorum"),
    ({"queue_arg": ["x-max-length=1", "x-max-length=2"]}, {}, "x-max-length is given 2 times"),
])
def test_bad_queue_args(flags, env, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        resolve(H, flags, env)


def test_classic_queues_may_set_what_quorum_queues_get_from_rmqpool():
    s = resolve(H, {"queue_arg": ["x-dead-letter-exchange=dlx", "x-overflow=reject-publish"]}, {})
    assert s.queue_arguments["x-dead-letter-exchange"] == "dlx"


# -- typos -------------------------------------------------------------------------------------
def test_unknown_rmqpool_variables_are_named_with_the_closest_option():
    env = {"RMQPOOL_WROKERS": "2", "RMQPOOL_QUEU": "x", "RMQPOOL_HANDLR": "m:f",
           "RMQPOOL_ZZZZZZZZ": "1", "RMQPOOL_WORKERS": "1", "RMQPOOL_HANDLER": H,
           "RMQPOOL_QUEUE_ARG": "a=1", "RABBITMQ_TEST_URL": "amqp://x/", "PATH": "/bin"}
    assert unknown_env(env) == [
        "RMQPOOL_HANDLR is not an rmqpool setting and is ignored; did you mean RMQPOOL_HANDLER?",
        "RMQPOOL_QUEU is not an rmqpool setting and is ignored; did you mean RMQPOOL_QUEUE?",
        "RMQPOOL_WROKERS is not an rmqpool setting and is ignored; did you mean RMQPOOL_WORKERS?",
        "RMQPOOL_ZZZZZZZZ is not an rmqpool setting and is ignored; see rmqpool --help for "
        "the options",
    ]
    assert unknown_env({opt.env: "" for opt in OPTIONS}) == []


def test_library_log_level_defaults_to_critical():
    assert resolve(H, {}, {}).library_log_level == "critical"
    assert resolve(H, {}, {"RMQPOOL_LIBRARY_LOG_LEVEL": "debug"}).library_log_level == "debug"
    with pytest.raises(SettingsError, match="--library-log-level 'loud' is not one of debug"):
        resolve(H, {"library_log_level": "loud"}, {})


def test_every_option_is_a_settings_field_with_the_options_default():
    import dataclasses

    from rmqpool.settings import OPTIONS, Settings

    fields = {f.name: f.default for f in dataclasses.fields(Settings)}
    for opt in OPTIONS:
        assert opt.attr in fields, opt.attr
        if opt.default is not None:
            assert fields[opt.attr] == opt.default, opt.attr
