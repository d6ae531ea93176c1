"""The `moderation` command: classify, generate, serve, batch, eval."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from moderation.classifier import ClassificationError
from moderation.logs import configure_logging
from moderation.policy import BUILTIN_POLICIES, DEFAULT_POLICY, PolicyError

# Exit codes shared by the subcommands.
EXIT_OK = 0
EXIT_FAILED_ROWS = 1  # batch: some rows could not be scored
EXIT_USAGE = 2  # bad arguments or input
EXIT_ERROR = 3  # could not load the model or another runtime failure


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", help="checkpoint folder; omitted = the demo model")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))


def _policy_arg(value: str) -> tuple[str, list[str]]:
    """A built-in policy name, or a policy file (loaded and then selected by its name)."""
    if value in BUILTIN_POLICIES:
        return value, []
    from moderation.policy import load_policy_file

    return load_policy_file(value).name, [value]


def _load(ns: argparse.Namespace, policy_files: Sequence[str] = (), **kwargs: Any) -> Any:
    from moderation.runtime import load_runtime

    runtime = load_runtime(
        ns.model, device=ns.device, dtype=ns.dtype, policy_files=policy_files, **kwargs
    )
    if runtime.demo:
        print(f"note: using the demo model ({runtime.model_id})", file=sys.stderr)
    return runtime


def _classify(ns: argparse.Namespace) -> int:
    policy, files = _policy_arg(ns.policy)
    runtime = _load(ns, files, long_text=ns.long_text)
    result = runtime.classifier.classify(
        ns.text,
        role=ns.role,
        user_prompt=ns.prompt,
        policy=policy,
        threshold=ns.threshold,
    )
    print(json.dumps(result.to_dict(), ensure_ascii=False))
    return EXIT_OK


def _generate(ns: argparse.Namespace) -> int:
    from moderation.guarded import GenerateOptions

    policy, files = _policy_arg(ns.policy)
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
    )
    result = runtime.generator.generate([{"role": "user", "content": ns.prompt}], options)
    print(json.dumps(asdict(result), ensure_ascii=False))
    return EXIT_OK


def _register_classify(sub: Any) -> None:
    p = sub.add_parser("classify", help="classify one text and print a JSON decision")
    _add_model_options(p)
    p.add_argument("--policy", default=DEFAULT_POLICY, help="paper, mistral-13 or a policy file")
    p.add_argument("--role", default="input", choices=("input", "output"))
    p.add_argument("--prompt", help="output role: the user prompt the text answers")
    p.add_argument("--threshold", type=float, help="flag when P(not acceptable) >= this")
    p.add_argument("--long-text", default="reject", choices=("reject", "split"))
    p.add_argument("text", help="the text to classify")
    p.set_defaults(func=_classify)


def _register_generate(sub: Any) -> None:
    p = sub.add_parser("generate", help="guarded generation for one user prompt")
    _add_model_options(p)
    p.add_argument("--no-guardrail", action="store_true", help="no guardrail system prompt")
    p.add_argument("--system-prompt", help="replace the guardrail system prompt")
    p.add_argument("--moderate-input", action="store_true", help="refuse flagged prompts")
    p.add_argument("--moderate-output", action="store_true", help="withhold flagged answers")
    p.add_argument("--policy", default=DEFAULT_POLICY, help="paper, mistral-13 or a policy file")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("prompt", help="the user prompt")
    p.set_defaults(func=_generate)


def _registrations() -> list[Callable[[Any], None]]:
    # Each subcommand module registers its own parser (and imports its heavy parts lazily).
    from moderation import batch, evaluate, server

    return [
        _register_classify,
        _register_generate,
        server.register,
        batch.register,
        evaluate.register,
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moderation", description="Content moderation on Mistral 7B Instruct."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _registrations():
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command != "serve":  # the server configures its own logging from its settings
        configure_logging("warning", json=False)
    try:
        code: int = ns.func(ns)
    except (ClassificationError, PolicyError) as exc:
        print(f"moderation {ns.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
