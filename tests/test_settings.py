"""moderation.serving.settings: precedence, parsing, validation and the option table."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from moderation.serving.settings import (
    DECLARATIONS,
    DEFAULTS,
    ENV_PREFIX,
    OPTIONS,
    ServeSettings,
    SettingsError,
    add_serve_arguments,
    settings_from_args,
    settings_from_env,
)


def parse(argv: list[str], env: dict[str, str] | None = None) -> ServeSettings:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return settings_from_args(parser.parse_args(argv), env or {})


def test_defaults() -> None:
    s = parse([])
    assert s == ServeSettings()
    assert s.model is None
    assert (s.host, s.port, s.metrics_port) == ("0.0.0.0", 50051, 9464)
    assert (s.device, s.dtype, s.attention_backend) == ("auto", "auto", "auto")
    assert (s.policy, s.policy_files, s.threshold) == ("paper", (), 0.5)
    assert (s.max_batch_size, s.max_queue, s.max_batch_items) == ("auto", 1024, 256)
    assert (s.max_text_chars, s.long_text, s.max_new_tokens) == (32768, "reject", 512)
    assert s.max_message_bytes == 4 * 1024 * 1024
    assert s.grace_period == 30.0
    assert (s.tls_cert, s.tls_key, s.tls_client_ca) == (None, None, None)
    assert (s.auth_token_file, s.auth_token) == (None, None)
    assert (s.log_text, s.log_level) == (False, "info")
    assert not s.tls and not s.mutual_tls and s.resolve_auth_token() is None


def test_option_table_covers_every_field() -> None:
    names = [f.name for f in dataclasses.fields(ServeSettings)]
    assert list(OPTIONS) == names
    assert set(DEFAULTS) == set(names)
    for name, (flag, env) in OPTIONS.items():
        assert flag == "--" + name.replace("_", "-")
        assert env == ENV_PREFIX + name.upper()


def test_help_names_env_var_and_default() -> None:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    text = " ".join(parser.format_help().split())  # undo line wrapping
    for name, (flag, env) in OPTIONS.items():
        assert flag in text
        assert env in text, name
    assert "default 50051" in text
    assert "--no-log-text" in text


def test_environment_is_read() -> None:
    env = {
        "MODERATION_MODEL": "/models/mistral-7b-instruct",
        "MODERATION_PORT": "6000",
        "MODERATION_METRICS_PORT": "0",
        "MODERATION_DEVICE": "cuda:1",
        "MODERATION_DTYPE": "BFloat16",
        "MODERATION_ATTENTION_BACKEND": "sdpa",
        "MODERATION_POLICY": "mistral-13",
        "MODERATION_POLICY_FILES": "/etc/a.json, /etc/b.json,",
        "MODERATION_THRESHOLD": "0.8",
        "MODERATION_MAX_BATCH_SIZE": "64",
        "MODERATION_LONG_TEXT": "split",
        "MODERATION_GRACE_PERIOD": "12.5",
        "MODERATION_LOG_TEXT": "yes",
        "MODERATION_LOG_LEVEL": "DEBUG",
    }
    s = settings_from_env(env)
    assert s.model == "/models/mistral-7b-instruct"
    assert (s.port, s.metrics_port, s.device, s.dtype) == (6000, 0, "cuda:1", "bfloat16")
    assert s.attention_backend == "sdpa"
    assert s.policy == "mistral-13"
    assert s.policy_files == ("/etc/a.json", "/etc/b.json")
    assert (s.threshold, s.max_batch_size, s.long_text) == (0.8, 64, "split")
    assert (s.grace_period, s.log_text, s.log_level) == (12.5, True, "debug")


def test_command_line_beats_environment() -> None:
    env = {"MODERATION_PORT": "6000", "MODERATION_LOG_TEXT": "true", "MODERATION_POLICY": "x"}
    s = parse(["--port", "7000", "--no-log-text"], env)
    assert s.port == 7000
    assert s.log_text is False
    assert s.policy == "x"  # not given on the command line: the environment applies
    assert parse(["--log-text"]).log_text is True


def test_empty_env_var_means_unset() -> None:
    s = settings_from_env({"MODERATION_MODEL": "", "MODERATION_PORT": "  "})
    assert s.model is None
    assert s.port == 50051
    assert parse(["--model", ""]).model is None


def test_uses_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODERATION_MAX_QUEUE", "17")
    assert settings_from_env().max_queue == 17


@pytest.mark.parametrize(
    ("argv", "env", "name"),
    [
        (["--port", "http"], {}, "port"),
        ([], {"MODERATION_PORT": "50051.5"}, "port"),
        (["--port", "0"], {}, "port"),
        ([], {"MODERATION_PORT": "70000"}, "port"),
        (["--metrics-port", "-1"], {}, "metrics_port"),
        (["--metrics-port", "50051"], {}, "metrics_port"),
        (["--dtype", "int4"], {}, "dtype"),
        ([], {"MODERATION_ATTENTION_BACKEND": "xformers"}, "attention_backend"),
        ([], {"MODERATION_LONG_TEXT": "truncate"}, "long_text"),
        (["--log-level", "trace"], {}, "log_level"),
        (["--device", "tpu"], {}, "device"),
        (["--threshold", "1.5"], {}, "threshold"),
        ([], {"MODERATION_THRESHOLD": "-0.1"}, "threshold"),
        ([], {"MODERATION_THRESHOLD": "nan"}, "threshold"),
        (["--max-batch-size", "0"], {}, "max_batch_size"),
        ([], {"MODERATION_MAX_BATCH_SIZE": "lots"}, "max_batch_size"),
        (["--max-context", "0"], {}, "max_context"),
        ([], {"MODERATION_GPU_MEMORY_UTILIZATION": "1.5"}, "gpu_memory_utilization"),
        (["--gpu-memory-utilization", "0"], {}, "gpu_memory_utilization"),
        (["--cache-memory", "lots"], {}, "cache_memory"),
        ([], {"MODERATION_CACHE_MEMORY": "0"}, "cache_memory"),
        ([], {"MODERATION_MAX_QUEUE": "many"}, "max_queue"),
        (["--grace-period", "-1"], {}, "grace_period"),
        ([], {"MODERATION_LOG_TEXT": "maybe"}, "log_text"),
        (["--tls-cert", "/tls/tls.crt"], {}, "tls_key"),
        ([], {"MODERATION_TLS_KEY": "/tls/tls.key"}, "tls_cert"),
        (["--tls-client-ca", "/tls/ca.crt"], {}, "tls_client_ca"),
        (["--auth-token", "a", "--auth-token-file", "/t"], {}, "auth_token"),
        (["--stream-check-tokens", "0"], {}, "stream_check_tokens"),
        ([], {"MODERATION_STREAM_CHECK_TOKENS": "4097"}, "stream_check_tokens"),
    ],
)
def test_invalid_values_name_option_and_env_var(
    argv: list[str], env: dict[str, str], name: str
) -> None:
    flag, env_name = OPTIONS[name]
    with pytest.raises(SettingsError) as info:
        parse(argv, env)
    assert flag in str(info.value)
    assert env_name in str(info.value)
    assert isinstance(info.value, ValueError)


def test_stream_check_tokens_reaches_the_planner_default() -> None:
    assert parse([]).stream_check_tokens == 16
    s = parse(["--stream-check-tokens", "8"], {"MODERATION_STREAM_CHECK_TOKENS": "32"})
    assert s.stream_check_tokens == 8  # the command line beats the environment
    assert settings_from_env({"MODERATION_STREAM_CHECK_TOKENS": "32"}).stream_check_tokens == 32
    assert s.runtime_settings().stream_check_tokens == 8


def test_direct_construction_is_validated() -> None:
    with pytest.raises(SettingsError, match="MODERATION_THRESHOLD"):
        ServeSettings(threshold=2.0)


def test_tls_and_mutual_tls() -> None:
    s = parse(["--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-client-ca", "ca.pem"])
    assert s.tls and s.mutual_tls
    s = parse(["--tls-cert", "c.pem", "--tls-key", "k.pem"])
    assert s.tls and not s.mutual_tls


def test_auth_token_sources(tmp_path) -> None:
    s = settings_from_env({"MODERATION_AUTH_TOKEN": "s3cret"})
    assert s.resolve_auth_token() == "s3cret"
    assert "s3cret" not in repr(s)  # secrets stay out of logs
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    s = parse(["--auth-token-file", str(token_file)])
    assert s.resolve_auth_token() == "from-file"
    with pytest.raises(SettingsError, match="MODERATION_AUTH_TOKEN_FILE"):
        parse(["--auth-token-file", str(tmp_path / "missing")]).resolve_auth_token()
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SettingsError, match="empty"):
        parse(["--auth-token-file", str(tmp_path / "empty")]).resolve_auth_token()


def test_settings_map_onto_the_runtime_they_load() -> None:
    s = ServeSettings(
        model="/models/m", device="cpu", dtype="float32", attention_backend="sdpa",
        policy="mistral-13", policy_files=("a.json",), threshold=0.25, long_text="split",
        max_batch_size=5, max_new_tokens=77, max_context=2048, gpu_memory_utilization=0.5,
        cache_memory=1 << 30, compile=True,
    )  # fmt: skip
    r = s.runtime_settings()
    assert (r.model, r.device, r.dtype) == ("/models/m", "cpu", "float32")
    assert r.attention_backend == "sdpa"
    assert (r.policy, r.policy_files, r.threshold) == ("mistral-13", ("a.json",), 0.25)
    assert (r.long_text, r.max_batch_size, r.score_batch_size) == ("split", 5, 5)
    assert r.max_new_tokens == 77
    assert (r.max_context, r.gpu_memory_utilization, r.cache_memory) == (2048, 0.5, 1 << 30)
    assert r.compile is True
    # A runtime field named as a setting is that setting: no second name to keep in step.
    shared = [f.name for f in dataclasses.fields(r) if f.name in OPTIONS]
    assert set(shared) == {f.name for f in dataclasses.fields(r)} - {
        "max_text_tokens",
        "score_batch_size",
    }
    assert all(getattr(r, name) == getattr(s, name) for name in shared)


def test_bounds_are_declared_with_each_setting_and_checked_from_there() -> None:
    for name, option in DECLARATIONS.items():
        if isinstance(DEFAULTS[name], int | float) and not isinstance(DEFAULTS[name], bool):
            assert option.bounds() is not None, f"{name} declares no bounds"
    assert DECLARATIONS["port"].bounds() == "in [1, 65535]"
    assert DECLARATIONS["gpu_memory_utilization"].bounds() == "in (0, 1]"
    assert DECLARATIONS["max_queue"].bounds() == "at least 1"
    assert DECLARATIONS["log_level"].bounds() == "one of debug, info, warning, error"
    with pytest.raises(
        SettingsError, match=r"--stream-check-tokens .*must be in \[1, 4096\], got 4097"
    ):
        ServeSettings(stream_check_tokens=4097)
    with pytest.raises(SettingsError, match=r"must be an integer at least 1, got 2\.5"):
        ServeSettings(max_queue=2.5)  # type: ignore[arg-type]
    with pytest.raises(SettingsError, match=r"must be above 0, got 0.0"):
        ServeSettings(keepalive_time=0.0)


def test_max_batch_size_auto_reaches_the_engine() -> None:
    """auto (the default) is passed on for both kinds of slots; the engine sizes them (32 on
    CPU, from the memory budget on CUDA: tests/test_memory.py)."""
    r = parse([]).runtime_settings()
    assert (r.max_batch_size, r.score_batch_size) == ("auto", "auto")
    assert parse(["--max-batch-size", "AUTO"]).max_batch_size == "auto"
    assert parse(["--max-batch-size", "12"]).max_batch_size == 12


def test_memory_settings_from_the_command_line_and_the_environment() -> None:
    s = parse([])
    assert (s.max_context, s.gpu_memory_utilization, s.cache_memory) == (8192, 0.9, None)
    assert s.compile is True and parse(["--no-compile"]).compile is False
    assert settings_from_env({"MODERATION_COMPILE": "false"}).compile is False
    s = parse(["--max-context", "4096", "--cache-memory", "512MiB"])
    assert (s.max_context, s.cache_memory) == (4096, 512 << 20)
    env = {
        "MODERATION_MAX_CONTEXT": "16384",
        "MODERATION_GPU_MEMORY_UTILIZATION": "0.8",
        "MODERATION_CACHE_MEMORY": "4G",
    }
    s = settings_from_env(env)
    assert (s.max_context, s.gpu_memory_utilization, s.cache_memory) == (16384, 0.8, 4 << 30)
    assert settings_from_env({"MODERATION_CACHE_MEMORY": "1048576"}).cache_memory == 1 << 20
