"""Command-line options shared by the commands that load a model or call servers: one
definition of each, so `classify`, `generate`, `batch` and `eval` spell them the same."""

from __future__ import annotations

import argparse
from typing import Any

from moderation.core.builtin_policies import BUILTIN_POLICIES
from moderation.core.limits import DEFAULT_MAX_CONTEXT, DTYPES, LONG_TEXT_MODES
from moderation.core.policy import PolicyError, Role, is_policy_file, load_policy_file
from moderation.core.thresholds import OperatingPoint, ThresholdsError, load_operating_point


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
    p.add_argument(
        "--torch-threads",
        type=_threads,
        default=0,
        metavar="N",
        help="torch threads of the model in this process (default 0: the CPUs the container "
        "may use, its cgroup CPU quota, not the host's cores)",
    )


def _threads(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError(f"expected a count of threads (0 = auto), got {value!r}")
    return count


def add_long_text_option(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--long-text",
        default=default,
        choices=LONG_TEXT_MODES,
        help=f"texts longer than the model takes: reject them or split them (default {default})",
    )


def add_policy_option(
    p: argparse.ArgumentParser, default: str | None, *, remote: bool = False
) -> None:
    """--policy; `remote`: the command can score through servers (--target), which may know
    more names. classify and generate cannot: their help names no server."""
    known = (
        "paper, mistral-13; with --target, any the servers know"
        if remote
        else ("paper, mistral-13")
    )
    p.add_argument(
        "--policy",
        default=default,
        help=f"policy name ({known}) or a .json/.toml policy file",
    )


def add_threshold_options(p: argparse.ArgumentParser) -> None:
    """--threshold and --thresholds FILE (an operating point from `eval --write-thresholds`)."""
    p.add_argument("--threshold", type=float, help="flag when P(not acceptable) >= this")
    p.add_argument(
        "--thresholds",
        metavar="FILE",
        help="thresholds file written by `moderation eval --write-thresholds` (its policy is "
        "the default policy; --threshold overrides it)",
    )


def threshold_options(ns: argparse.Namespace, policy: str | None) -> tuple[str | None, Any]:
    """(policy, ClassifyItem threshold fields) from --policy, --threshold and --thresholds."""
    point: OperatingPoint | None = None
    if ns.thresholds is not None:
        point = load_operating_point(ns.thresholds)
        if policy is not None and policy != point.policy:
            raise ThresholdsError(
                f"{ns.thresholds} holds thresholds for policy {point.policy!r}, not {policy!r}"
            )
        policy = point.policy
    if ns.threshold is not None or point is None:
        return policy, {"threshold": ns.threshold}
    return policy, {
        "threshold": point.threshold,
        "category_thresholds": dict(point.category_thresholds),
    }


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


def policy_option(value: str | None, *, remote: bool = False) -> tuple[str | None, tuple[str, ...]]:
    """A --policy value as (policy name, policy files to load). A policy file is loaded to
    learn its name. In this process only the built-in names exist: any other name is an error
    now, before minutes of loading a model; a server (remote) may know more names."""
    if value is None or value in BUILTIN_POLICIES:
        return value, ()
    if is_policy_file(value):
        return load_policy_file(value).name, (value,)
    if remote:
        return value, ()
    raise PolicyError(
        f"unknown policy {value!r}: the built-in policies are {', '.join(sorted(BUILTIN_POLICIES))}"
        ", or give a policy file (.json or .toml)"
    )
