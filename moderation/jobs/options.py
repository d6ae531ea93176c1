"""Command-line options shared by the commands that load a model or call servers: one
definition of each, so `classify`, `generate`, `batch` and `eval` spell them the same."""

from __future__ import annotations

import argparse

from moderation.core.builtin_policies import BUILTIN_POLICIES
from moderation.core.limits import LONG_TEXT_MODES
from moderation.core.policy import Role, is_policy_file, load_policy_file
from moderation.runtime import DEFAULT_MAX_CONTEXT, DTYPES


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--model, --device, --dtype, --max-context: the model loaded in this process."""
    p.add_argument("--model", metavar="DIR", help="checkpoint folder; omitted = the demo model")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument(
        "--max-context",
        type=int,
        default=DEFAULT_MAX_CONTEXT,
        metavar="TOKENS",
        help="longest sequence, in tokens; also the cache rows per slot of a model without a "
        f"sliding window (default {DEFAULT_MAX_CONTEXT})",
    )


def add_long_text_option(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--long-text",
        default=default,
        choices=LONG_TEXT_MODES,
        help=f"texts longer than the model takes: reject them or split them (default {default})",
    )


def add_policy_option(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument(
        "--policy",
        default=default,
        help="policy name (paper, mistral-13, or one the server knows) or a .json/.toml file",
    )


def add_role_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--role",
        default=Role.INPUT.value,
        choices=[r.value for r in Role],
        help="what the text is: a user prompt (input) or a model's answer (output)",
    )


def add_remote_options(p: argparse.ArgumentParser) -> None:
    """--target and its connection options: score through running servers."""
    p.add_argument(
        "--target",
        action="append",
        metavar="HOST:PORT",
        help="remote server(s); repeat or use dns:///name",
    )
    p.add_argument("--concurrency", type=int, default=8, help="remote: requests in flight")
    p.add_argument("--token", help="remote: bearer token")
    p.add_argument("--token-file", help="remote: file holding the bearer token")
    p.add_argument("--tls-ca", help="remote: CA certificate to verify the servers (enables TLS)")


def policy_option(value: str | None) -> tuple[str | None, tuple[str, ...]]:
    """A --policy value as (policy name, policy files to load). A name passes through (the
    runtime or the server knows it, or says it does not); a policy file is loaded to learn
    its name."""
    if value is None or value in BUILTIN_POLICIES or not is_policy_file(value):
        return value, ()
    return load_policy_file(value).name, (value,)
