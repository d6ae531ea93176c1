"""The small things an operator trips over (#23): each message says what to do, the commands
agree on their defaults, category and paper_category follow one rule, a port in use is one
clear line, the README's commands use a venv the quick start made."""

from __future__ import annotations

import math
import re
import socket
from pathlib import Path

import pytest

from moderation.cli import build_parser, main
from moderation.core.builtin_policies import BUILTIN_POLICIES
from moderation.core.chat import ChatMessage
from moderation.core.decision import ClassifyItem, decide
from moderation.core.errors import InvalidArgument
from moderation.core.planning import Planner
from moderation.exit_codes import EXIT_ERROR, EXIT_USAGE
from moderation.runtime import Runtime

ROOT = Path(__file__).resolve().parent.parent


def test_classify_without_a_text_says_to_give_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["classify"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "give a text to classify, or --messages FILE.json" in err and "not both" not in err
    assert main(["classify", "--messages", "chat.json", "hi"]) == EXIT_USAGE
    assert "not both" in capsys.readouterr().err


def test_every_command_rejects_long_texts_unless_told() -> None:
    parser = build_parser()
    for argv in (["classify", "x"], ["batch", "in.csv", "-o", "o.csv"], ["eval", "set.csv"]):
        assert parser.parse_args(argv).long_text == "reject", argv


def test_the_long_text_error_names_the_option_and_the_setting(demo_runtime: Runtime) -> None:
    base = demo_runtime.planner
    planner = Planner(base.tokenizer, base.limits, max_text_tokens=8)
    with pytest.raises(InvalidArgument) as exc:
        planner.plan(ClassifyItem("a long text " * 20))
    assert exc.value.field == "text"
    assert "--long-text split" in exc.value.message
    assert "MODERATION_LONG_TEXT=split" in exc.value.message
    with pytest.raises(InvalidArgument, match="--long-text split"):
        planner.plan(ClassifyItem(messages=[ChatMessage("user", "word " * 40)]))


def _help(command: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[command].format_help()  # type: ignore[attr-defined, no-any-return]


def test_in_process_commands_do_not_mention_a_server() -> None:
    for command in ("classify", "generate"):
        assert "server" not in _help(command), command
    assert "--target" in _help("batch") and "servers know" in _help("batch")


def test_paper_category_is_what_category_rolls_up_into() -> None:
    policy = BUILTIN_POLICIES["mistral-13"]
    ids = [*policy.category_ids, "acceptable"]
    hateful = [c.id for c in policy.categories if c.paper_category == "hateful_harassing_violent"]
    assert len(hateful) >= 2

    def decision(probs: dict[str, float]):  # type: ignore[no-untyped-def]
        rest = (1 - sum(probs.values())) / (len(ids) - len(probs))
        logprobs = [math.log(probs.get(c, rest)) for c in ids]
        return decide(policy, logprobs, threshold=0.5, category_thresholds={}, model_id="m",
                      prompt_tokens=1)  # fmt: skip

    # Acceptable is the most probable label, though two hateful categories together outweigh
    # it: the two fields still agree (the summed view is paper_scores').
    spread = decision({"acceptable": 0.34, hateful[0]: 0.3, hateful[1]: 0.3})
    assert spread.category == "acceptable" and spread.paper_category == "acceptable"
    assert max(spread.paper_scores, key=spread.paper_scores.__getitem__) == (
        "hateful_harassing_violent"
    )
    one = decision({hateful[1]: 0.6, "acceptable": 0.3})
    assert one.category == hateful[1] and one.paper_category == "hateful_harassing_violent"


def test_a_port_in_use_is_one_clear_line(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
                     "--model", str(tmp_path / "never-loaded")])  # fmt: skip
    assert code == EXIT_ERROR
    err = capfd.readouterr().err
    assert f"port {port} on 127.0.0.1 is in use" in err
    assert "add_port" not in err and len(err.strip().splitlines()) == 1


def test_the_readme_commands_use_the_venv_the_quick_start_made() -> None:
    readme = (ROOT / "README.md").read_text()
    using = readme[readme.index("## Using it") :]
    using = using[: using.index("\n## ", 3)]
    assert "source .venv-serve/bin/activate" in using
    assert not re.search(r"\.venv/bin/moderation", using)
    quick = readme[readme.index("## Quick start") : readme.index("## Installing")]
    assert "make serve" in quick and ".venv-serve" in quick
