"""Settings of ``moderation serve``: command line, environment, defaults.

Every setting is a field of :class:`ServeSettings`, a command-line option and an environment
variable (``MODERATION_`` + the field name in upper case; :data:`OPTIONS` has the table).
Precedence: command line > environment > default. An environment variable set to the empty
string counts as unset, so a Kubernetes manifest can blank a value to get the default.

Invalid values raise :class:`SettingsError`, whose message names both the option and the
environment variable, so the operator can fix whichever one they used.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from moderation.core.generation import MAX_STREAM_CHECK_TOKENS
from moderation.core.limits import LONG_TEXT_MODES
from moderation.runtime import (
    ATTENTION_BACKENDS,
    DEFAULT_GPU_MEMORY_UTILIZATION,
    DEFAULT_MAX_CONTEXT,
    DTYPES,
    RuntimeSettings,
)
from moderation.serving.setting_values import (
    DEVICE_RE,
    choice,
    parse_bool,
    parse_bytes,
    parse_device,
    parse_float,
    parse_int,
    parse_list,
    parse_str,
)

ENV_PREFIX = "MODERATION_"

LOG_LEVELS = ("debug", "info", "warning", "error")


class SettingsError(ValueError):
    """An invalid setting; the message names the option and its environment variable."""


@dataclass(frozen=True)
class Option:
    """How a setting is read from text (the environment or the command line) and described."""

    parse: Callable[[str], Any]
    help: str
    metavar: str | None = None


def _setting(
    default: Any,
    parse: Callable[[str], Any],
    help: str,
    *,
    metavar: str | None = None,
    secret: bool = False,
) -> Any:
    """A ServeSettings field with its option: one declaration per setting."""
    option = Option(parse, help, metavar)
    return field(default=default, repr=not secret, metadata={"option": option})


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``moderation serve`` is configured with. All fields have defaults; each
    field's option (parser, help, metavar) is declared with it."""

    model: str | None = _setting(
        None,
        parse_str,
        "checkpoint folder (Mistral consolidated or Hugging Face layout); "
        "unset = the built-in demo model (random weights)",
        metavar="PATH",
    )
    host: str = _setting(
        "0.0.0.0",
        parse_str,
        "address to listen on",
        metavar="ADDR",
    )
    port: int = _setting(
        50051,
        parse_int,
        "gRPC port",
        metavar="PORT",
    )
    metrics_port: int = _setting(
        9464,  # the OpenTelemetry Prometheus exporter's port; 9090 is Prometheus's own
        parse_int,
        "Prometheus metrics port; 0 = no metrics endpoint",
        metavar="PORT",
    )
    http_port: int = _setting(
        0,
        parse_int,
        "HTTP/JSON port (every RPC by its google.api.http rule, plus OpenAI's /v1/moderations "
        "and Mistral's /v1/chat/moderations); same auth, TLS and limits; 0 = off",
        metavar="PORT",
    )
    device: str = _setting(
        "auto",
        parse_device,
        "torch device: auto, cpu, cuda or cuda:N",
    )
    dtype: str = _setting(
        "auto",
        choice(DTYPES),
        "weight dtype: " + ", ".join(DTYPES),
        metavar="{" + ",".join(DTYPES) + "}",
    )
    attention_backend: str = _setting(
        "auto",
        choice(ATTENTION_BACKENDS),
        "attention implementation: " + ", ".join(ATTENTION_BACKENDS),
        metavar="{" + ",".join(ATTENTION_BACKENDS) + "}",
    )
    policy: str = _setting(
        "paper",
        parse_str,
        "default moderation policy for requests that name none",
        metavar="NAME",
    )
    policy_files: tuple[str, ...] = _setting(
        (),
        parse_list,
        "comma-separated custom policy files (JSON or TOML) to load",
        metavar="PATHS",
    )
    thresholds: tuple[str, ...] = _setting(
        (),
        parse_list,
        "comma-separated thresholds files (`moderation eval --write-thresholds`), one per "
        "policy: the thresholds of requests of that policy that set none",
        metavar="PATHS",
    )
    threshold: float = _setting(
        0.5,
        parse_float,
        "default threshold on P(not acceptable), in [0, 1]",
        metavar="P",
    )
    max_batch_size: int = _setting(
        32,
        parse_int,
        "most sequences the engine runs in one step",
        metavar="N",
    )
    max_context: int = _setting(
        DEFAULT_MAX_CONTEXT,
        parse_int,
        "longest sequence (prompt + answer) served, in tokens; for models without a sliding "
        "window (Mistral 7B v0.2/v0.3) it also sizes each cache slot",
        metavar="TOKENS",
    )
    gpu_memory_utilization: float = _setting(
        DEFAULT_GPU_MEMORY_UTILIZATION,
        parse_float,
        "CUDA: fraction of the device for weights, activations and KV cache; the cache slots "
        "are sized from what is left",
        metavar="FRACTION",
    )
    cache_memory: int | None = _setting(
        None,
        parse_bytes,
        "KV cache budget (e.g. 4GiB); CPU: unset = a quarter of available memory, at most "
        "4 GiB; CUDA: a cap on what --gpu-memory-utilization leaves",
        metavar="BYTES",
    )
    compile: bool = _setting(
        False,
        parse_bool,
        "compile the decode step (torch.compile; captured as CUDA graphs on CUDA), which removes "
        "the per-step launch overhead at the cost of a slower start; ignored (with a warning) "
        "on CPU, where the compiled step is slower than eager",
    )
    max_queue: int = _setting(
        1024,
        parse_int,
        "most waiting requests before RESOURCE_EXHAUSTED",
        metavar="N",
    )
    max_batch_items: int = _setting(
        256,
        parse_int,
        "most texts in one ClassifyBatch call",
        metavar="N",
    )
    max_text_chars: int = _setting(
        32768,
        parse_int,
        "longest text or chat message accepted, in characters",
        metavar="N",
    )
    long_text: str = _setting(
        "reject",
        choice(LONG_TEXT_MODES),
        "texts over --max-text-chars: reject them or split them into windows",
        metavar="{" + ",".join(LONG_TEXT_MODES) + "}",
    )
    max_messages: int = _setting(
        256,
        parse_int,
        "most chat messages in one Generate call or one conversation to classify",
        metavar="N",
    )
    plan_threads: int = _setting(
        2,
        parse_int,
        "threads that validate and tokenize requests, off the gRPC event loop",
        metavar="N",
    )
    model_stall_timeout: float = _setting(
        60.0,
        parse_float,
        "seconds the model may make no progress while work is queued before health turns "
        "NOT_SERVING (a hung model process); 0 = never",
        metavar="SECONDS",
    )
    keepalive_time: float = _setting(
        60.0,
        parse_float,
        "seconds between keepalive pings the server sends on an idle connection "
        "(grpc.keepalive_time_ms)",
        metavar="SECONDS",
    )
    keepalive_timeout: float = _setting(
        20.0,
        parse_float,
        "seconds to wait for a keepalive ping's answer before closing the connection "
        "(grpc.keepalive_timeout_ms)",
        metavar="SECONDS",
    )
    max_connection_idle: float = _setting(
        300.0,
        parse_float,
        "seconds a connection without calls stays open (grpc.max_connection_idle_ms)",
        metavar="SECONDS",
    )
    max_connection_age: float = _setting(
        1800.0,
        parse_float,
        "seconds before a connection is asked to reconnect, so that long-lived clients reach "
        "new replicas after a scale-up (grpc.max_connection_age_ms)",
        metavar="SECONDS",
    )
    max_connection_age_grace: float = _setting(
        30.0,
        parse_float,
        "seconds the calls of an aged connection get to finish (grpc.max_connection_age_grace_ms)",
        metavar="SECONDS",
    )
    max_concurrent_streams: int = _setting(
        100,
        parse_int,
        "most calls at once on one connection; more wait in the client "
        "(grpc.max_concurrent_streams)",
        metavar="N",
    )
    handshake_timeout: float = _setting(
        10.0,
        parse_float,
        "seconds a new connection has to finish its handshake (TCP, TLS, HTTP/2 preface) "
        "(grpc.server_handshake_timeout_ms)",
        metavar="SECONDS",
    )
    max_new_tokens: int = _setting(
        512,
        parse_int,
        "default and maximum tokens generated per request",
        metavar="N",
    )
    stream_check_tokens: int = _setting(
        16,
        parse_int,
        "with moderate_output, check the answer every N generated tokens (a request's "
        "stream_check_tokens overrides it); GenerateStream releases text only after a check, "
        "so N trades time to the first text against checking cost (1..4096)",
        metavar="N",
    )
    max_stream_checks: int = _setting(
        16,
        parse_int,
        "most ModerateStream checks open at once (each holds a generation cache slot while "
        "open); more are refused with RESOURCE_EXHAUSTED",
        metavar="N",
    )
    stream_max_answer_chars: int = _setting(
        65536,
        parse_int,
        "longest answer a ModerateStream check takes, in characters (INVALID_ARGUMENT past it; "
        "the model's classification prompt also bounds it in tokens)",
        metavar="N",
    )
    stream_idle_timeout: float = _setting(
        30.0,
        parse_float,
        "seconds a ModerateStream check may wait for the caller's next message; then it ends "
        "with DEADLINE_EXCEEDED and frees its cache slot",
        metavar="SECONDS",
    )
    max_message_bytes: int = _setting(
        4 * 1024 * 1024,
        parse_int,
        "largest gRPC message received or sent, in bytes",
        metavar="BYTES",
    )
    grace_period: float = _setting(
        30.0,
        parse_float,
        "seconds to finish in-flight requests after SIGTERM",
        metavar="SECONDS",
    )
    tls_cert: str | None = _setting(
        None,
        parse_str,
        "PEM server certificate (chain); enables TLS, needs --tls-key",
        metavar="PEM",
    )
    tls_key: str | None = _setting(
        None,
        parse_str,
        "PEM private key of --tls-cert",
        metavar="PEM",
    )
    tls_client_ca: str | None = _setting(
        None,
        parse_str,
        "PEM CA bundle; set = mutual TLS (clients must present a certificate)",
        metavar="PEM",
    )
    auth_token_file: str | None = _setting(
        None,
        parse_str,
        "file holding the bearer token clients must send",
        metavar="PATH",
    )
    auth_token: str | None = _setting(
        None,
        parse_str,
        "bearer token clients must send (prefer the env var or "
        "--auth-token-file: command lines are visible to other processes)",
        metavar="TOKEN",
        secret=True,  # never print secrets
    )
    model_process: bool = _setting(
        True,
        parse_bool,
        "run the model in a process of its own, so that it does not share the GIL "
        "with the gRPC event loop",
    )
    torch_threads: int = _setting(
        0,
        parse_int,
        "torch threads of the model; 0 = the CPUs the container may use (its cgroup CPU "
        "quota, not the host's cores), less one for the gRPC process when the model runs "
        "in its own process",
        metavar="N",
    )
    log_text: bool = _setting(
        False,
        parse_bool,
        "log request texts (off by default: they are user data)",
    )
    tracing: bool = _setting(
        False,
        parse_bool,
        "OpenTelemetry spans of each call and its stages (plan, queue, model), the trace id "
        "in the log line; needs the tracing extra",
    )
    log_level: str = _setting(
        "info",
        choice(LOG_LEVELS),
        "log level: " + ", ".join(LOG_LEVELS),
        metavar="{" + ",".join(LOG_LEVELS) + "}",
    )

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def tls(self) -> bool:
        """Whether the server listens with TLS."""
        return self.tls_cert is not None

    @property
    def mutual_tls(self) -> bool:
        """Whether clients must present a certificate signed by tls_client_ca."""
        return self.tls_client_ca is not None

    def grpc_options(self) -> list[tuple[str, int]]:
        """The gRPC server's channel arguments: message sizes and the connection limits."""

        def ms(seconds: float) -> int:
            return max(1, round(seconds * 1000))

        return [
            # Deliberate limits: larger requests fail with RESOURCE_EXHAUSTED in gRPC itself.
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            # A second server on a taken port must fail, not silently share it.
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_time_ms", ms(self.keepalive_time)),
            ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout)),
            ("grpc.max_connection_idle_ms", ms(self.max_connection_idle)),
            ("grpc.max_connection_age_ms", ms(self.max_connection_age)),
            ("grpc.max_connection_age_grace_ms", ms(self.max_connection_age_grace)),
            ("grpc.max_concurrent_streams", self.max_concurrent_streams),
            ("grpc.server_handshake_timeout_ms", ms(self.handshake_timeout)),
        ]

    def runtime_settings(self) -> RuntimeSettings:
        """What the model runtime is built from."""
        return RuntimeSettings(
            model=self.model,
            device=self.device,
            dtype=self.dtype,
            attention_backend=self.attention_backend,
            policy_files=self.policy_files,
            thresholds_files=self.thresholds,
            default_policy=self.policy,
            threshold=self.threshold,
            long_text=self.long_text,
            max_batch_size=self.max_batch_size,
            score_batch_size=self.max_batch_size,
            max_new_tokens_limit=self.max_new_tokens,
            stream_check_tokens=self.stream_check_tokens,
            max_context=self.max_context,
            gpu_memory_utilization=self.gpu_memory_utilization,
            cache_memory_bytes=self.cache_memory,
            compile=self.compile,
        )

    def resolve_auth_token(self) -> str | None:
        """The bearer token clients must send, from auth_token or auth_token_file; None = no auth.

        Read at start-up, not per call; surrounding whitespace (a trailing newline) is dropped.
        """
        if self.auth_token is not None:
            return self.auth_token
        if self.auth_token_file is None:
            return None
        try:
            token = Path(self.auth_token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SettingsError(
                f"{_names('auth_token_file')}: cannot read {self.auth_token_file!r}: {exc}"
            ) from exc
        if not token:
            raise SettingsError(f"{_names('auth_token_file')}: {self.auth_token_file!r} is empty")
        return token


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env(name: str) -> str:
    return ENV_PREFIX + name.upper()


OPTIONS: dict[str, tuple[str, str]] = {
    f.name: (_flag(f.name), _env(f.name)) for f in fields(ServeSettings)
}
"""Field name -> (command-line flag, environment variable), for every setting."""

DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(ServeSettings)}
"""Field name -> default value."""


_OPTION: dict[str, Option] = {f.name: f.metadata["option"] for f in fields(ServeSettings)}
"""Field name -> its option."""

_OPTIONAL_STR = frozenset(f.name for f in fields(ServeSettings) if f.default is None)
"""Fields where an empty value means unset."""


def _names(name: str) -> str:
    flag, env = OPTIONS[name]
    return f"{flag} / {env}"


def _describe_default(name: str) -> str:
    value = DEFAULTS[name]
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value) if value else "none"
    return str(value)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one option per ServeSettings field. Defaults are None so the environment can apply."""
    group = parser.add_argument_group(
        "server settings",
        f"Each option can also be set with its environment variable ({ENV_PREFIX}*); "
        "the command line wins.",
    )
    for name, (flag, env) in OPTIONS.items():
        # argparse %-formats help strings, so escape any literal percent sign.
        help_text = f"{_OPTION[name].help} [env {env}; default {_describe_default(name)}]"
        help_text = help_text.replace("%", "%%")
        if isinstance(DEFAULTS[name], bool):
            group.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            # Keep the text: parsing happens in settings_from_args, so errors name both sources.
            group.add_argument(
                flag, dest=name, default=None, metavar=_OPTION[name].metavar, help=help_text
            )


def settings_from_args(
    ns: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ServeSettings:
    """Build settings from parsed arguments, then the environment, then the defaults."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, (flag, env_name) in OPTIONS.items():
        raw = getattr(ns, name, None)
        source = flag
        if raw is None:
            raw = env.get(env_name)
            source = env_name
            if raw is not None and not raw.strip():
                raw = None  # empty env var = unset
        if raw is None:
            continue
        if isinstance(raw, str):
            try:
                value = _OPTION[name].parse(raw)
            except ValueError as exc:
                raise SettingsError(f"{_names(name)} (from {source}): {exc}") from None
        else:
            value = raw  # booleans from BooleanOptionalAction
        if name in _OPTIONAL_STR and value == "":
            value = None  # "--model ''" = unset, like an empty env var
        values[name] = value
    return ServeSettings(**values)


def settings_from_env(environ: Mapping[str, str] | None = None) -> ServeSettings:
    """Settings from the environment alone (for embedding the server without a command line)."""
    return settings_from_args(argparse.Namespace(), environ)


# --- validation of typed values -----------------------------------------------------------------


def _validate(s: ServeSettings) -> None:
    def fail(name: str, message: str) -> None:
        raise SettingsError(f"{_names(name)}: {message}")

    for name in ("port", "metrics_port", "http_port"):
        value = getattr(s, name)
        low = 0 if name in ("metrics_port", "http_port") else 1
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= 65535:
            fail(name, f"must be an integer port in [{low}, 65535], got {value!r}")
    if s.metrics_port == s.port:
        fail("metrics_port", f"must differ from the gRPC port ({_names('port')} = {s.port})")
    if s.http_port and s.http_port in (s.port, s.metrics_port):
        fail("http_port", f"must differ from {_names('port')} and {_names('metrics_port')}")
    if not s.host:
        fail("host", "must not be empty")
    for name in (
        "max_batch_size",
        "max_context",
        "max_queue",
        "max_batch_items",
        "max_text_chars",
        "max_new_tokens",
        "max_message_bytes",
        "max_messages",
        "plan_threads",
        "max_concurrent_streams",
        "max_stream_checks",
        "stream_max_answer_chars",
    ):
        value = getattr(s, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            fail(name, f"must be a positive integer, got {value!r}")
    if not 1 <= s.stream_check_tokens <= MAX_STREAM_CHECK_TOKENS:
        fail(
            "stream_check_tokens",
            f"must be between 1 and {MAX_STREAM_CHECK_TOKENS}, got {s.stream_check_tokens!r}",
        )
    if not isinstance(s.torch_threads, int) or s.torch_threads < 0:
        fail("torch_threads", f"must be a non-negative integer (0 = auto), got {s.torch_threads!r}")
    for name in ("model_stall_timeout", "max_connection_age_grace"):
        value = getattr(s, name)
        if not (math.isfinite(value) and value >= 0):
            fail(name, f"must be a non-negative number of seconds, got {value!r}")
    for name in (
        "keepalive_time",
        "keepalive_timeout",
        "max_connection_idle",
        "max_connection_age",
        "handshake_timeout",
        "stream_idle_timeout",
    ):
        value = getattr(s, name)
        if not (math.isfinite(value) and value > 0):
            fail(name, f"must be a positive number of seconds, got {value!r}")
    if not 0.0 < s.gpu_memory_utilization <= 1.0:
        fail("gpu_memory_utilization", f"must be in (0, 1], got {s.gpu_memory_utilization!r}")
    if s.cache_memory is not None and s.cache_memory < 1:
        fail("cache_memory", f"must be a positive number of bytes, got {s.cache_memory!r}")
    if not 0.0 <= s.threshold <= 1.0:
        fail("threshold", f"must be in [0, 1], got {s.threshold!r}")
    if not (math.isfinite(s.grace_period) and s.grace_period >= 0):
        fail("grace_period", f"must be a non-negative number of seconds, got {s.grace_period!r}")
    if not DEVICE_RE.match(s.device):
        fail("device", f"expected auto, cpu, cuda or cuda:N; got {s.device!r}")
    for name, options in (
        ("dtype", DTYPES),
        ("attention_backend", ATTENTION_BACKENDS),
        ("long_text", LONG_TEXT_MODES),
        ("log_level", LOG_LEVELS),
    ):
        if getattr(s, name) not in options:
            fail(name, f"expected one of {', '.join(options)}; got {getattr(s, name)!r}")
    if not s.policy:
        fail("policy", "must not be empty")
    if not isinstance(s.policy_files, tuple):
        fail("policy_files", "must be a tuple of paths")
    if not isinstance(s.thresholds, tuple):
        fail("thresholds", "must be a tuple of paths")
    if (s.tls_cert is None) != (s.tls_key is None):
        missing = "tls_key" if s.tls_key is None else "tls_cert"
        other = "tls_cert" if missing == "tls_key" else "tls_key"
        fail(missing, f"is required when {_names(other)} is set")
    if s.tls_client_ca is not None and s.tls_cert is None:
        fail("tls_client_ca", f"mutual TLS needs a server certificate: set {_names('tls_cert')}")
    if s.auth_token is not None and s.auth_token_file is not None:
        fail("auth_token", f"set either it or {_names('auth_token_file')}, not both")
    if s.auth_token is not None and not s.auth_token.strip():
        fail("auth_token", "must not be blank")
