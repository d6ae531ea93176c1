"""The `moderation` command: classify, generate, serve, batch, eval.

The one place that wires serving and the jobs into commands.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import structlog

from model.errors import CheckpointError, EngineError, TokenizerError
from moderation.core.builtin_policies import DEFAULT_POLICY
from moderation.core.errors import InvalidArgument
from moderation.core.generation import GenerateOptions
from moderation.core.policy import PolicyError
from moderation.exit_codes import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from moderation.jobs import batch, evaluate
from moderation.jobs.options import (
    add_long_text_option,
    add_model_options,
    add_policy_option,
    add_role_option,
    add_threshold_options,
    policy_option,
    threshold_options,
)
from moderation.runtime import Runtime, check_policies, load_runtime
from moderation.serving.grpc.server import LOADER_THREAD, serve
from moderation.serving.logs import configure_logging
from moderation.serving.settings import SettingsError, add_serve_arguments, settings_from_args


def _load(ns: argparse.Namespace, policy_files: Sequence[str], **kwargs: Any) -> Runtime:
    # Loading the demo model logs one warning that says so; nothing to add here.
    return load_runtime(
        ns.model,
        device=ns.device,
        dtype=ns.dtype,
        max_context=ns.max_context,
        policy_files=policy_files,
        **kwargs,
    )


def _classify(ns: argparse.Namespace) -> int:
    policy, files = policy_option(ns.policy)
    policy, thresholds = threshold_options(ns, policy)
    runtime = _load(ns, files, long_text=ns.long_text)
    result = runtime.classifier.classify(
        ns.text, role=ns.role, user_prompt=ns.prompt, policy=policy, **thresholds
    )
    print(json.dumps(result.to_dict(), ensure_ascii=False))
    return EXIT_OK


def _generate(ns: argparse.Namespace) -> int:
    policy, files = policy_option(ns.policy)
    runtime = _load(ns, files)
    options = GenerateOptions(
        max_new_tokens=ns.max_new_tokens,
        temperature=ns.temperature,
        top_p=ns.top_p,
        seed=ns.seed,
        guardrail=not ns.no_guardrail,
        system_prompt=ns.system_prompt,
        moderate_input=ns.moderate_input,
        moderate_output=ns.moderate_output,
        policy=policy,
        stream_check_tokens=ns.stream_check_tokens,
    )
    result = runtime.generator.generate([{"role": "user", "content": ns.prompt}], options)
    print(json.dumps(asdict(result), ensure_ascii=False))
    return EXIT_OK


def _serve(ns: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(ns)
        settings.resolve_auth_token()  # fail now on an unreadable token file
        # A bad policy name or file fails now, not after minutes of loading the weights.
        check_policies(settings.runtime_settings())
    except (SettingsError, PolicyError) as exc:
        print(f"moderation serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log_level)
    try:
        code = asyncio.run(serve(settings))
    except (OSError, RuntimeError) as exc:  # e.g. the port is taken or a TLS file is missing
        structlog.get_logger("moderation.server").error("could not start", error=str(exc))
        return EXIT_ERROR
    if any(t.name == LOADER_THREAD and t.is_alive() for t in threading.enumerate()):
        # Stopped while the model was loading, which cannot be interrupted: leave now rather
        # than finalize the interpreter under the loading thread (torch then aborts, exit 134).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _register_classify(sub: Any) -> None:
    p = sub.add_parser("classify", help="classify one text and print a JSON decision")
    add_model_options(p)
    add_policy_option(p, DEFAULT_POLICY)
    add_role_option(p)
    p.add_argument("--prompt", help="output role: the user prompt the text answers")
    add_threshold_options(p)
    add_long_text_option(p, "reject")
    p.add_argument("text", help="the text to classify")
    p.set_defaults(func=_classify)


def _register_generate(sub: Any) -> None:
    p = sub.add_parser("generate", help="guarded generation for one user prompt")
    add_model_options(p)
    p.add_argument("--no-guardrail", action="store_true", help="no guardrail system prompt")
    p.add_argument("--system-prompt", help="replace the guardrail system prompt")
    p.add_argument("--moderate-input", action="store_true", help="refuse flagged prompts")
    p.add_argument("--moderate-output", action="store_true", help="withhold flagged answers")
    p.add_argument(
        "--stream-check-tokens", type=int, metavar="N",
        help="with --moderate-output, check the answer every N tokens and stop at the first "
        "flagging check (default 16)",
    )  # fmt: skip
    add_policy_option(p, DEFAULT_POLICY)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("prompt", help="the user prompt")
    p.set_defaults(func=_generate)


def _register_serve(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the gRPC moderation server",
        description="Serve moderation.v1.ModerationService over gRPC (demo model without --model).",
    )
    add_serve_arguments(p)
    p.set_defaults(func=_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moderation", description="Content moderation on Mistral 7B Instruct."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in (
        _register_classify,
        _register_generate,
        _register_serve,
        batch.register,
        evaluate.register,
    ):
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command != "serve":  # the server configures its own logging from its settings
        configure_logging("warning", json=False)
    try:
        code: int = ns.func(ns)
    except (InvalidArgument, PolicyError, CheckpointError, TokenizerError) as exc:
        # Bad arguments or input, a model folder that is not a checkpoint: one line, no trace.
        print(f"moderation {ns.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except EngineError as exc:  # e.g. the model does not fit the memory budget
        print(f"moderation {ns.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return code


if __name__ == "__main__":
    sys.exit(main())
