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

from moderation.core.limits import LONG_TEXT_MODES
from moderation.runtime import ATTENTION_BACKENDS, DTYPES, RuntimeSettings

ENV_PREFIX = "MODERATION_"

LOG_LEVELS = ("debug", "info", "warning", "error")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class SettingsError(ValueError):
    """An invalid setting; the message names the option and its environment variable."""


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``moderation serve`` is configured with. All fields have defaults."""

    model: str | None = None
    """Checkpoint folder (Mistral or Hugging Face layout); None = the built-in demo model."""
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int = 9090
    """Prometheus /metrics port; 0 = no metrics endpoint."""
    device: str = "auto"
    dtype: str = "auto"
    attention_backend: str = "auto"
    policy: str = "paper"
    """Default policy for requests that name none."""
    policy_files: tuple[str, ...] = ()
    """Custom policy files (JSON) loaded at start-up in addition to the built-in policies."""
    threshold: float = 0.5
    """Default threshold on P(not acceptable)."""
    max_batch_size: int = 32
    """Most sequences the engine runs in one step."""
    max_queue: int = 1024
    """Most requests waiting; beyond it requests fail with RESOURCE_EXHAUSTED."""
    max_batch_items: int = 256
    """Most texts in one ClassifyBatch call."""
    max_text_chars: int = 32768
    long_text: str = "reject"
    """What to do with a text over max_text_chars: "reject" it or "split" it into windows."""
    max_new_tokens: int = 512
    max_message_bytes: int = 4 * 1024 * 1024
    grace_period: float = 30.0
    """Seconds to drain in-flight requests after SIGTERM."""
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    """CA bundle for client certificates; set = mutual TLS."""
    auth_token_file: str | None = None
    auth_token: str | None = field(default=None, repr=False)  # never print secrets
    model_process: bool = True
    """Run the model in a process of its own (no GIL shared with the gRPC event loop)."""
    torch_threads: int = 0
    """torch intra-op threads of the model; 0 = all cores, less one for the gRPC process when
    the model runs in its own process."""
    log_text: bool = False
    """Log request texts (off by default: texts are user data)."""
    log_level: str = "info"

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

    def runtime_settings(self) -> RuntimeSettings:
        """What the model runtime is built from."""
        return RuntimeSettings(
            model=self.model,
            device=self.device,
            dtype=self.dtype,
            attention_backend=self.attention_backend,
            policy_files=self.policy_files,
            default_policy=self.policy,
            threshold=self.threshold,
            long_text=self.long_text,
            max_batch_size=self.max_batch_size,
            score_batch_size=self.max_batch_size,
            max_new_tokens_limit=self.max_new_tokens,
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


_OPTIONAL_STR = frozenset(f.name for f in fields(ServeSettings) if f.default is None)
"""Fields where an empty value means unset."""


def _names(name: str) -> str:
    flag, env = OPTIONS[name]
    return f"{flag} / {env}"


# --- parsing: text (from the environment or the command line) -> typed value -------------------


def _parse_int(text: str) -> int:
    try:
        return int(text.strip(), 10)
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None


def _parse_float(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {text!r}")
    return value


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"expected true/false (or 1/0, yes/no, on/off), got {text!r}")


def _parse_str(text: str) -> str:
    return text.strip()


def _parse_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}; got {text!r}")
        return value

    return parse


def _parse_device(text: str) -> str:
    value = text.strip().lower()
    if not _DEVICE_RE.match(value):
        raise ValueError(f"expected auto, cpu, cuda or cuda:N; got {text!r}")
    return value


_PARSERS: dict[str, Callable[[str], Any]] = {
    "model": _parse_str,
    "host": _parse_str,
    "port": _parse_int,
    "metrics_port": _parse_int,
    "device": _parse_device,
    "dtype": _choice(DTYPES),
    "attention_backend": _choice(ATTENTION_BACKENDS),
    "policy": _parse_str,
    "policy_files": _parse_list,
    "threshold": _parse_float,
    "max_batch_size": _parse_int,
    "max_queue": _parse_int,
    "max_batch_items": _parse_int,
    "max_text_chars": _parse_int,
    "long_text": _choice(LONG_TEXT_MODES),
    "max_new_tokens": _parse_int,
    "max_message_bytes": _parse_int,
    "grace_period": _parse_float,
    "tls_cert": _parse_str,
    "tls_key": _parse_str,
    "tls_client_ca": _parse_str,
    "auth_token_file": _parse_str,
    "auth_token": _parse_str,
    "model_process": _parse_bool,
    "torch_threads": _parse_int,
    "log_text": _parse_bool,
    "log_level": _choice(LOG_LEVELS),
}

_HELP: dict[str, str] = {
    "model": "checkpoint folder (Mistral consolidated or Hugging Face layout); "
    "unset = the built-in demo model (random weights)",
    "host": "address to listen on",
    "port": "gRPC port",
    "metrics_port": "Prometheus metrics port; 0 = no metrics endpoint",
    "device": "torch device: auto, cpu, cuda or cuda:N",
    "dtype": "weight dtype: " + ", ".join(DTYPES),
    "attention_backend": "attention implementation: " + ", ".join(ATTENTION_BACKENDS),
    "policy": "default moderation policy for requests that name none",
    "policy_files": "comma-separated custom policy files (JSON) to load",
    "threshold": "default threshold on P(not acceptable), in [0, 1]",
    "max_batch_size": "most sequences the engine runs in one step",
    "max_queue": "most waiting requests before RESOURCE_EXHAUSTED",
    "max_batch_items": "most texts in one ClassifyBatch call",
    "max_text_chars": "longest text or chat message accepted, in characters",
    "long_text": "texts over --max-text-chars: reject them or split them into windows",
    "max_new_tokens": "default and maximum tokens generated per request",
    "max_message_bytes": "largest gRPC message received or sent, in bytes",
    "grace_period": "seconds to finish in-flight requests after SIGTERM",
    "tls_cert": "PEM server certificate (chain); enables TLS, needs --tls-key",
    "tls_key": "PEM private key of --tls-cert",
    "tls_client_ca": "PEM CA bundle; set = mutual TLS (clients must present a certificate)",
    "auth_token_file": "file holding the bearer token clients must send",
    "auth_token": "bearer token clients must send (prefer the env var or "
    "--auth-token-file: command lines are visible to other processes)",
    "model_process": "run the model in a process of its own, so that it does not share the GIL "
    "with the gRPC event loop",
    "torch_threads": "torch threads of the model; 0 = all cores, less one for the gRPC process "
    "when the model runs in its own process",
    "log_text": "log request texts (off by default: they are user data)",
    "log_level": "log level: " + ", ".join(LOG_LEVELS),
}

_METAVARS: dict[str, str] = {
    "model": "PATH",
    "host": "ADDR",
    "port": "PORT",
    "metrics_port": "PORT",
    "policy": "NAME",
    "policy_files": "PATHS",
    "threshold": "P",
    "max_batch_size": "N",
    "max_queue": "N",
    "max_batch_items": "N",
    "max_text_chars": "N",
    "max_new_tokens": "N",
    "max_message_bytes": "BYTES",
    "dtype": "{" + ",".join(DTYPES) + "}",
    "attention_backend": "{" + ",".join(ATTENTION_BACKENDS) + "}",
    "long_text": "{" + ",".join(LONG_TEXT_MODES) + "}",
    "log_level": "{" + ",".join(LOG_LEVELS) + "}",
    "grace_period": "SECONDS",
    "tls_cert": "PEM",
    "tls_key": "PEM",
    "tls_client_ca": "PEM",
    "auth_token_file": "PATH",
    "auth_token": "TOKEN",
    "torch_threads": "N",
}


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
        help_text = f"{_HELP[name]} [env {env}; default {_describe_default(name)}]"
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
                flag, dest=name, default=None, metavar=_METAVARS.get(name), help=help_text
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
                value = _PARSERS[name](raw)
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

    for name in ("port", "metrics_port"):
        value = getattr(s, name)
        low = 0 if name == "metrics_port" else 1
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= 65535:
            fail(name, f"must be an integer port in [{low}, 65535], got {value!r}")
    if s.metrics_port == s.port:
        fail("metrics_port", f"must differ from the gRPC port ({_names('port')} = {s.port})")
    if not s.host:
        fail("host", "must not be empty")
    for name in (
        "max_batch_size",
        "max_queue",
        "max_batch_items",
        "max_text_chars",
        "max_new_tokens",
        "max_message_bytes",
    ):
        value = getattr(s, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            fail(name, f"must be a positive integer, got {value!r}")
    if not isinstance(s.torch_threads, int) or s.torch_threads < 0:
        fail("torch_threads", f"must be a non-negative integer (0 = auto), got {s.torch_threads!r}")
    if not 0.0 <= s.threshold <= 1.0:
        fail("threshold", f"must be in [0, 1], got {s.threshold!r}")
    if not (math.isfinite(s.grace_period) and s.grace_period >= 0):
        fail("grace_period", f"must be a non-negative number of seconds, got {s.grace_period!r}")
    if not _DEVICE_RE.match(s.device):
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
