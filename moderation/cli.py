"""The `moderation` command: classify, generate, serve, batch, eval.

The one place that wires serving and the jobs into commands.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from moderation.core.builtin_policies import DEFAULT_POLICY
from moderation.core.chat import ChatMessage, check_conversation
from moderation.core.errors import InvalidArgument
from moderation.core.generation import GenerateOptions
from moderation.core.policy import PolicyError
from moderation.exit_codes import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from moderation.extras import (
    SERVER_EXTRA,
    MissingServerExtra,
    install_hint,
    missing_server_modules,
    require_server_extra,
)
from moderation.jobs import batch, evaluate
from moderation.jobs.conversations import read_messages_file
from moderation.jobs.options import (
    add_long_text_option,
    add_model_options,
    add_policy_option,
    add_role_option,
    add_threshold_options,
    policy_option,
    threshold_options,
)

if TYPE_CHECKING:
    from moderation.runtime import Runtime

# The engine, the server and their logging come with the `server` extra: they are imported by
# the commands that use them, so that the light client's install (`pip install
# mistral-moderation`) still runs `moderation batch --target ...` and says what to install for
# the rest.


def _load(ns: argparse.Namespace, policy_files: Sequence[str], **kwargs: Any) -> Runtime:
    require_server_extra(f"moderation {ns.command}")
    from moderation.runtime import load_runtime, set_torch_threads

    set_torch_threads(ns.torch_threads)
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
    if ns.text is None and ns.messages is None:
        raise InvalidArgument("text", "give a text to classify, or --messages FILE.json")
    if ns.text is not None and ns.messages is not None:
        raise InvalidArgument("text", "give either a text or --messages FILE.json, not both")
    messages = None
    if ns.messages is not None:
        # The file is read before the model loads: a bad one fails in a moment.
        messages = read_messages_file(ns.messages)
        check_conversation(messages, end=("user", "assistant"))
        for given, option in ((ns.role, "--role"), (ns.prompt, "--prompt")):
            if given is not None:
                raise InvalidArgument(
                    "messages",
                    f"{option} does not go with --messages: the last message is classified, "
                    "as a user prompt or an answer by its role, after the earlier ones",
                )
    policy, files = policy_option(ns.policy)
    policy, thresholds = threshold_options(ns, policy)
    runtime = _load(ns, files, long_text=ns.long_text)
    result = runtime.classifier.classify(
        ns.text or "",
        role=ns.role,
        user_prompt=ns.prompt,
        policy=policy,
        messages=messages,
        **thresholds,
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
    result = runtime.generator.generate([ChatMessage("user", ns.prompt)], options)
    print(json.dumps(asdict(result), ensure_ascii=False))
    return EXIT_OK


def _serve(ns: argparse.Namespace) -> int:
    import asyncio
    import os
    import threading

    import structlog

    from moderation.runtime import check_policies
    from moderation.serving.grpc.server import LOADER_THREAD, serve
    from moderation.serving.logs import configure_logging
    from moderation.serving.settings import SettingsError, settings_from_args
    from moderation.serving.tracing import missing_tracing_modules

    try:
        settings = settings_from_args(ns)
        settings.resolve_auth_token()  # fail now on an unreadable token file
        # A bad policy name or file fails now, not after minutes of loading the weights.
        check_policies(settings.runtime_settings())
        if settings.tracing and missing_tracing_modules():
            raise SettingsError(
                f"--tracing (MODERATION_TRACING) needs the tracing extra: {install_hint('tracing')}"
            )
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
    p.set_defaults(role=None)  # input, unless given; and not given with --messages
    p.add_argument("--prompt", help="output role: the user prompt the text answers")
    p.add_argument(
        "--messages",
        metavar="FILE.json",
        help="classify the last message of a conversation in the context of the earlier ones: "
        'a JSON list of {"role", "content"} (system first if any, then user and assistant '
        "alternating); instead of TEXT",
    )
    add_threshold_options(p)
    add_long_text_option(p, "reject")
    p.add_argument("text", nargs="?", help="the text to classify")
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
    if missing_server_modules():
        # Only the light client is installed: the options cannot even be listed (they come
        # from the server's settings). Any arguments are taken (main) and the command says
        # what to install.
        p.description = f"{p.description} Needs the server extra: {SERVER_EXTRA}"
        p.set_defaults(func=_serve_needs_extra)
        return
    from moderation.serving.settings import add_serve_arguments

    add_serve_arguments(p)
    p.set_defaults(func=_serve)


def _serve_needs_extra(ns: argparse.Namespace) -> int:
    require_server_extra("moderation serve")
    raise AssertionError("the server extra is installed after all")  # checked when registered


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


def _engine_errors(kind: str) -> tuple[type[Exception], ...]:
    """The engine's errors of a kind ("usage": a bad checkpoint or tokenizer; "error": the
    engine failed). Looked up only when an exception is being matched, and only if the engine
    was imported: an engine that never ran raised nothing, and importing it costs torch."""
    errors = sys.modules.get("model.errors")
    if errors is None:
        return ()
    if kind == "usage":
        return (errors.CheckpointError, errors.TokenizerError)
    return (errors.EngineError,)


def _usage_errors() -> tuple[type[Exception], ...]:
    return (InvalidArgument, PolicyError, *_engine_errors("usage"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns, unknown = parser.parse_known_args(argv)
    if unknown and ns.func is not _serve_needs_extra:  # that one says what to install instead
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    # The server configures its own logging from its settings; the other commands log only
    # through the engine (the server extra), so without it there is nothing to configure.
    if ns.command != "serve" and not missing_server_modules():
        from moderation.serving.logs import configure_logging

        configure_logging("warning", json=False)
    try:
        code: int = ns.func(ns)
    except MissingServerExtra as exc:  # rerunning gives the same result: a usage error
        print(exc, file=sys.stderr)  # "moderation serve needs the server extra ..."
        return EXIT_USAGE
    except _usage_errors() as exc:
        # Bad arguments or input, a model folder that is not a checkpoint: one line, no trace.
        print(f"moderation {ns.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except _engine_errors("error") as exc:  # e.g. the model does not fit the memory budget
        print(f"moderation {ns.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return code


if __name__ == "__main__":
    sys.exit(main())
