"""The `server` extra: what serving and in-process scoring import beyond the light client.

`pip install .` (in a checkout: the package is not on PyPI) installs the client (grpc,
protobuf, the stubs); the engine, the server and the commands that load a model need
`pip install '.[server]'`.
Those commands check for it first and say so in one line, rather than fail on an import deep in
the engine.
"""

from __future__ import annotations

import importlib.util


def install_hint(extra: str) -> str:
    """How to install an extra: the package is not on PyPI, so from a checkout."""
    return f"pip install '.[{extra}]' (in a checkout of the repository)"


SERVER_EXTRA = install_hint("server")

SERVER_EXTRA_MODULES = (
    "torch",
    "numpy",
    "sentencepiece",
    "safetensors",
    "structlog",
    "prometheus_client",
    "grpc_health",
    "grpc_reflection",
    "grpc_status",
    "mistral_common",
    "aiohttp",
)
"""The top-level modules the `server` extra's distributions provide (pyproject.toml)."""


REPORT_MODULES = ("matplotlib", "sklearn")
"""The top-level modules of the `report` extra (`moderation eval --report`)."""


class MissingServerExtra(Exception):
    """A command that needs the server extra, run where only the light client is installed."""

    def __init__(self, what: str, missing: list[str]):
        self.missing = missing
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        super().__init__(
            f"{what} needs the server extra ({missing[0]}{more} not installed): {SERVER_EXTRA}"
        )


def missing_server_modules() -> list[str]:
    """The server extra's modules that cannot be found (found, not imported: this is cheap)."""
    return [m for m in SERVER_EXTRA_MODULES if importlib.util.find_spec(m) is None]


def require_server_extra(what: str) -> None:
    """Raise MissingServerExtra naming `what` (e.g. "moderation serve") when the extra is
    missing."""
    missing = missing_server_modules()
    if missing:
        raise MissingServerExtra(what, missing)
