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
import re
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
    parse_batch_size,
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
# A served model name: what a model id looks like in OpenAI's and Hugging Face's APIs.
_MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,255}")


class SettingsError(ValueError):
    """An invalid setting; the message names the option and its environment variable."""


@dataclass(frozen=True)
class Option:
    """How a setting is read from text (the environment or the command line), described, and
    bounded: a number in [low, high] (`low_exclusive`: above low), or one of `choices`."""

    parse: Callable[[str], Any]
    help: str
    metavar: str | None = None
    low: float | None = None
    high: float | None = None
    low_exclusive: bool = False
    choices: tuple[str, ...] | None = None

    def bounds(self) -> str | None:
        """The bounds in words ("in [1, 65535]", "at least 1", "one of a, b"), or None."""
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        if self.low is None and self.high is None:
            return None
        low = "" if self.low is None else _number(self.low)
        if self.high is None:
            return f"above {low}" if self.low_exclusive else f"at least {low}"
        if self.low is None:
            return f"at most {_number(self.high)}"
        return f"in {'(' if self.low_exclusive else '['}{low}, {_number(self.high)}]"

    def check(self, value: Any) -> str | None:
        """What is wrong with a typed value against the bounds, or None."""
        if value is None:
            return None
        if self.choices is not None:
            return None if value in self.choices else f"must be {self.bounds()}; got {value!r}"
        if self.low is None and self.high is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be a number {self.bounds()}, got {value!r}"
        if isinstance(self.low, int) and not isinstance(value, int):
            return f"must be an integer {self.bounds()}, got {value!r}"
        below = self.low is not None and (
            value <= self.low if self.low_exclusive else value < self.low
        )
        above = self.high is not None and value > self.high
        if not math.isfinite(value) or below or above:
            return f"must be {self.bounds()}, got {value!r}"
        return None


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _setting(
    default: Any,
    parse: Callable[[str], Any],
    help: str,
    *,
    metavar: str | None = None,
    low: float | None = None,
    high: float | None = None,
    low_exclusive: bool = False,
    secret: bool = False,
) -> Any:
    """A ServeSettings field with its option and bounds: one declaration per setting. Integer
    bounds (`low=1`) make an integer setting, float ones (`low=0.0`) a number."""
    option = Option(parse, help, metavar, low, high, low_exclusive)
    return field(default=default, repr=not secret, metadata={"option": option})


def _choice(default: str, options: tuple[str, ...], help: str) -> Any:
    """A setting that takes one of `options`."""
    option = Option(choice(options), help, "{" + ",".join(options) + "}", choices=options)
    return field(default=default, metadata={"option": option})


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
        low=1,
        high=65535,
    )
    metrics_port: int = _setting(
        9464,  # the OpenTelemetry Prometheus exporter's port; 9090 is Prometheus's own
        parse_int,
        "Prometheus metrics port; 0 = no metrics endpoint",
        metavar="PORT",
        low=0,
        high=65535,
    )
    http_port: int = _setting(
        0,
        parse_int,
        "HTTP/JSON port (every RPC by its google.api.http rule, plus OpenAI's /v1/moderations, "
        "/v1/chat/completions and /v1/models, Mistral's /v1/chat/moderations, and /health); "
        "same auth, TLS and limits; 0 = off",
        metavar="PORT",
        low=0,
        high=65535,
    )
    served_model_name: tuple[str, ...] = _setting(
        (),
        parse_list,
        "the model's names on the HTTP port's OpenAI-compatible routes (vLLM's flag): the first "
        "is the `model` responses carry, the others aliases; none = the checkpoint's name",
        metavar="NAME[,ALIAS...]",
    )
    device: str = _setting(
        "auto",
        parse_device,
        "torch device: auto, cpu, cuda or cuda:N",
    )
    dtype: str = _choice(
        "auto",
        DTYPES,
        "weight dtype",
    )
    attention_backend: str = _choice(
        "auto",
        ATTENTION_BACKENDS,
        "attention implementation",
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
    warm_policies: tuple[str, ...] = _setting(
        (),
        parse_list,
        "comma-separated policies whose prompt prefixes are pre-filled before SERVING besides "
        "the default policy and those of the policy and thresholds files (`all`: every "
        "policy); any other policy's is pre-filled on its first request",
        metavar="NAMES",
    )
    threshold: float = _setting(
        0.5,
        parse_float,
        "default threshold on P(not acceptable), in [0, 1]",
        metavar="P",
        low=0.0,
        high=1.0,
    )
    max_batch_size: int | str = _setting(
        "auto",
        parse_batch_size,
        "most sequences the engine runs in one step (and scores in one pass); auto: as many "
        "as the memory budget holds on CUDA, at most 256, and 32 on CPU",
        metavar="N|auto",
    )
    max_context: int = _setting(
        DEFAULT_MAX_CONTEXT,
        parse_int,
        "longest sequence (prompt + answer) served, in tokens; for models without a sliding "
        "window (Mistral 7B v0.2/v0.3) it also sizes each cache slot",
        metavar="TOKENS",
        low=1,
    )
    gpu_memory_utilization: float = _setting(
        DEFAULT_GPU_MEMORY_UTILIZATION,
        parse_float,
        "CUDA: fraction of the device for weights, activations and KV cache; the cache slots "
        "are sized from what is left",
        metavar="FRACTION",
        low=0.0,
        high=1.0,
        low_exclusive=True,
    )
    cache_memory: int | None = _setting(
        None,
        parse_bytes,
        "KV cache budget (e.g. 4GiB); CPU: unset = a quarter of available memory, at most "
        "4 GiB; CUDA: a cap on what --gpu-memory-utilization leaves",
        metavar="BYTES",
        low=1,
    )
    compile: bool = _setting(
        True,
        parse_bool,
        "CUDA: run decode steps as CUDA graphs (torch.compile, mode reduce-overhead), one per "
        "batch bucket and span, all compiled and captured at start-up before health says "
        "SERVING (which takes longer); --no-compile runs eager. CPU runs eager either way: "
        "the compiled step is slower there",
    )
    batch_wait_ms: float = _setting(
        0.0,
        parse_float,
        "milliseconds a classifier pass may wait for more requests before it runs, until it "
        "holds --max-batch-size texts (never while generations run); 0 runs at once. Many "
        "callers: fuller passes, more decisions per second, up to this much more latency",
        metavar="MS",
        low=0.0,
        high=1000.0,
    )
    max_queue: int = _setting(
        1024,
        parse_int,
        "most waiting requests before RESOURCE_EXHAUSTED",
        metavar="N",
        low=1,
    )
    max_batch_items: int = _setting(
        256,
        parse_int,
        "most texts in one ClassifyBatch call",
        metavar="N",
        low=1,
    )
    max_text_chars: int = _setting(
        32768,
        parse_int,
        "longest text or chat message accepted, in characters",
        metavar="N",
        low=1,
    )
    long_text: str = _choice(
        "reject",
        LONG_TEXT_MODES,
        "texts over --max-text-chars: reject them or split them into windows",
    )
    max_messages: int = _setting(
        256,
        parse_int,
        "most chat messages in one Generate call or one conversation to classify",
        metavar="N",
        low=1,
    )
    plan_threads: int = _setting(
        2,
        parse_int,
        "threads that validate and tokenize requests, off the gRPC event loop",
        metavar="N",
        low=1,
    )
    model_stall_timeout: float = _setting(
        60.0,
        parse_float,
        "seconds the model may make no progress while work is queued before health turns "
        "NOT_SERVING (a hung model process); 0 = never",
        metavar="SECONDS",
        low=0.0,
    )
    keepalive_time: float = _setting(
        60.0,
        parse_float,
        "seconds between keepalive pings the server sends on an idle connection "
        "(grpc.keepalive_time_ms; HTTP: TCP keep-alive probes)",
        metavar="SECONDS",
        low=0.0,
        low_exclusive=True,
    )
    keepalive_timeout: float = _setting(
        20.0,
        parse_float,
        "seconds to wait for a keepalive ping's answer before closing the connection "
        "(grpc.keepalive_timeout_ms)",
        metavar="SECONDS",
        low=0.0,
        low_exclusive=True,
    )
    max_connection_idle: float = _setting(
        300.0,
        parse_float,
        "seconds a connection without calls stays open (grpc.max_connection_idle_ms; HTTP: "
        "keep-alive idle)",
        metavar="SECONDS",
        low=0.0,
        low_exclusive=True,
    )
    max_connection_age: float = _setting(
        1800.0,
        parse_float,
        "seconds before a connection is asked to reconnect, so that long-lived clients reach "
        "new replicas after a scale-up (grpc.max_connection_age_ms; HTTP: the next answer "
        "closes it)",
        metavar="SECONDS",
        low=0.0,
        low_exclusive=True,
    )
    max_connection_age_grace: float = _setting(
        30.0,
        parse_float,
        "seconds the calls of an aged connection get to finish (grpc.max_connection_age_grace_ms)",
        metavar="SECONDS",
        low=0.0,
    )
    max_concurrent_streams: int = _setting(
        100,
        parse_int,
        "most calls at once on one connection; more wait in the client "
        "(grpc.max_concurrent_streams). Keep it well above a client's calls at once on one "
        "channel: grpcio counts a finished call until its server side lets go of it, and "
        "refuses streams past the limit (UNAVAILABLE, REFUSED_STREAM) under load",
        metavar="N",
        low=1,
    )
    handshake_timeout: float = _setting(
        10.0,
        parse_float,
        "seconds a new connection has to finish its handshake (TCP, TLS, HTTP/2 preface) "
        "(grpc.server_handshake_timeout_ms); on the HTTP port, the TLS handshake and each "
        "request's headers",
        metavar="SECONDS",
        low=0.0,
        low_exclusive=True,
    )
    body_read_timeout: float = _setting(
        30.0,
        parse_float,
        "seconds an HTTP request's body may take to arrive once its headers have (408 after); "
        "a gRPC message's frames are bounded by keepalive and the connection's age",
        metavar="SECONDS",
        low=0.0,
        low_exclusive=True,
    )
    max_connections: int = _setting(
        1000,
        parse_int,
        "most open connections per port: gRPC refuses more (grpc."
        "max_allowed_incoming_connections), HTTP answers 503 and closes; both ports share "
        "the process's file descriptors",
        metavar="N",
        low=1,
    )
    max_new_tokens: int = _setting(
        512,
        parse_int,
        "default and maximum tokens generated per request",
        metavar="N",
        low=1,
    )
    stream_check_tokens: int = _setting(
        16,
        parse_int,
        "with moderate_output, check the answer every N generated tokens (a request's "
        "stream_check_tokens overrides it); GenerateStream releases text only after a check, "
        "so N trades time to the first text against checking cost (1..4096)",
        metavar="N",
        low=1,
        high=MAX_STREAM_CHECK_TOKENS,
    )
    max_stream_checks: int = _setting(
        16,
        parse_int,
        "most ModerateStream checks open at once (each holds a generation cache slot while "
        "open); more are refused with RESOURCE_EXHAUSTED",
        metavar="N",
        low=1,
    )
    stream_max_answer_chars: int = _setting(
        65536,
        parse_int,
        "longest answer a ModerateStream check takes, in characters (INVALID_ARGUMENT past it; "
        "the model's classification prompt also bounds it in tokens)",
        metavar="N",
        low=1,
    )
    stream_idle_timeout: float = _setting(
        30.0,
        parse_float,
        "seconds a ModerateStream check may wait for the caller's next message; then it ends "
        "with DEADLINE_EXCEEDED and frees its cache slot",
        metavar="SECONDS",
        low=0.0,
        low_exclusive=True,
    )
    max_message_bytes: int = _setting(
        4 * 1024 * 1024,
        parse_int,
        "largest gRPC message received or sent, in bytes",
        metavar="BYTES",
        low=1,
    )
    grace_period: float = _setting(
        30.0,
        parse_float,
        "seconds to finish in-flight requests after SIGTERM",
        metavar="SECONDS",
        low=0.0,
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
        low=0,
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
    log_level: str = _choice(
        "info",
        LOG_LEVELS,
        "log level",
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
            ("grpc.max_allowed_incoming_connections", self.max_connections),
        ]

    def runtime_settings(self) -> RuntimeSettings:
        """What the model runtime is built from: the settings of the same names (the engine's
        scoring slots are its generation slots: --max-batch-size sizes both)."""
        shared = {
            f.name: getattr(self, f.name) for f in fields(RuntimeSettings) if f.name in OPTIONS
        }
        return RuntimeSettings(**shared, score_batch_size=self.max_batch_size)

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


DECLARATIONS: dict[str, Option] = {f.name: f.metadata["option"] for f in fields(ServeSettings)}
"""Field name -> its declaration: parser, help and bounds."""

_OPTIONAL_STR = frozenset(f.name for f in fields(ServeSettings) if f.default is None)
"""Fields where an empty value means unset."""


def _names(name: str) -> str:
    flag, env = OPTIONS[name]
    return f"{flag} / {env}"


def describe_default(name: str) -> str:
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
        help_text = f"{DECLARATIONS[name].help} [env {env}; default {describe_default(name)}]"
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
                flag, dest=name, default=None, metavar=DECLARATIONS[name].metavar, help=help_text
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
                value = DECLARATIONS[name].parse(raw)
            except ValueError as exc:
                raise SettingsError(f"{_names(name)} (from {source}): {exc}") from None
        else:
            value = raw  # booleans from BooleanOptionalAction
        if name in _OPTIONAL_STR and value == "":
            value = None  # "--model ''" = unset, like an empty env var
        values[name] = value
    return ServeSettings(**values)


def settings_from_env(environ: Mapping[str, str] | None = None) -> ServeSettings:
    """Settings from the environment alone: what a program that embeds the server passes to
    `moderation.serving.grpc.server.serve` (see the README, next to the settings reference)."""
    return settings_from_args(argparse.Namespace(), environ)


# --- validation of typed values -----------------------------------------------------------------


def _validate(s: ServeSettings) -> None:
    """Each setting against the bounds declared with it, then the rules between settings."""

    def fail(name: str, message: str) -> None:
        raise SettingsError(f"{_names(name)}: {message}")

    for name, option in DECLARATIONS.items():
        problem = option.check(getattr(s, name))
        if problem is not None:
            fail(name, problem)
    # A number or a word: not a bound a declaration can state.
    if s.max_batch_size != "auto" and (
        not isinstance(s.max_batch_size, int)
        or isinstance(s.max_batch_size, bool)
        or s.max_batch_size < 1
    ):
        fail("max_batch_size", f"must be a positive integer or auto, got {s.max_batch_size!r}")
    if s.metrics_port == s.port:
        fail("metrics_port", f"must differ from the gRPC port ({_names('port')} = {s.port})")
    if s.http_port and s.http_port in (s.port, s.metrics_port):
        fail("http_port", f"must differ from {_names('port')} and {_names('metrics_port')}")
    if not s.host:
        fail("host", "must not be empty")
    if not DEVICE_RE.match(s.device):
        fail("device", f"expected auto, cpu, cuda or cuda:N; got {s.device!r}")
    if not s.policy:
        fail("policy", "must not be empty")
    for name in s.served_model_name:
        if not _MODEL_NAME_RE.fullmatch(name):
            fail(
                "served_model_name",
                f"{name[:80]!r} is not a model id (letters, digits and . _ : / @ + -, starting "
                "with a letter or digit, at most 256 characters)",
            )
    if not isinstance(s.policy_files, tuple):
        fail("policy_files", "must be a tuple of paths")
    if not isinstance(s.thresholds, tuple):
        fail("thresholds", "must be a tuple of paths")
    if not isinstance(s.warm_policies, tuple):
        fail("warm_policies", "must be a tuple of policy names")
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
