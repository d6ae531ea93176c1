"""`moderation classify` and `moderation generate` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moderation.cli import main
from moderation.core.chat import ChatMessage
from moderation.core.generation import GenerateOptions
from moderation.exit_codes import EXIT_USAGE
from moderation.runtime import Runtime
from moderation.serving.logs import use_colour


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict, str]:  # type: ignore[type-arg]
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else {}), err


def test_classify_prints_one_json_decision(
    capsys: pytest.CaptureFixture[str], demo_checkpoint: Path
) -> None:
    code, result, _ = run_cli(capsys, "classify", "--model", str(demo_checkpoint), "hello there")
    assert code == 0
    assert {"category", "flagged", "scores", "model", "policy"} <= set(result)
    assert result["policy"] == "paper"
    assert sum(result["scores"].values()) == pytest.approx(1.0)
    assert "demo" in result["model"]


def test_classify_output_role_with_mistral_13_and_a_prompt(
    capsys: pytest.CaptureFixture[str], demo_checkpoint: Path
) -> None:
    code, result, _ = run_cli(
        capsys, "classify", "--model", str(demo_checkpoint), "--policy", "mistral-13",
        "--role", "output", "--prompt", "How do I reset my password?", "Click 'forgot password'.",
    )  # fmt: skip
    assert code == 0
    assert result["policy"] == "mistral-13"
    assert len(result["scores"]) == 14


def test_classify_with_a_policy_file(
    capsys: pytest.CaptureFixture[str], demo_checkpoint: Path, tmp_path: Path
) -> None:
    policy = {
        "name": "shop",
        "description": "marketplace listings",
        "categories": [
            {"id": "counterfeit", "label": "counterfeit", "description": "Fake branded goods.",
             "paper_category": "illegal_activities"},
        ],
    }  # fmt: skip
    path = tmp_path / "shop.json"
    path.write_text(json.dumps(policy))
    code, result, _ = run_cli(
        capsys, "classify", "--model", str(demo_checkpoint), "--policy", str(path), "a watch"
    )
    assert code == 0
    assert result["policy"] == "shop"
    assert set(result["scores"]) == {"counterfeit", "acceptable"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--threshold", "3", "x"], "threshold"),
        (["--policy", "/no/such/policy.json", "x"], "policy.json"),
        (["   "], "text: must not be empty"),
    ],
)
def test_classify_errors_exit_2_with_a_message(
    capsys: pytest.CaptureFixture[str], demo_checkpoint: Path, args: list[str], message: str
) -> None:
    code, _, err = run_cli(capsys, "classify", "--model", str(demo_checkpoint), *args)
    assert code == EXIT_USAGE
    assert message in err


def test_generate_prints_the_guarded_result(
    capsys: pytest.CaptureFixture[str], demo_checkpoint: Path, demo_runtime: Runtime
) -> None:
    code, result, _ = run_cli(
        capsys, "generate", "--model", str(demo_checkpoint), "--moderate-input",
        "--max-new-tokens", "5", "Tell me a joke",
    )  # fmt: skip
    assert code == 0
    # The same answer as the generator in this process, with the input moderated first.
    expected = demo_runtime.generator.generate(
        [ChatMessage("user", "Tell me a joke")],
        GenerateOptions(max_new_tokens=5, moderate_input=True),
    )
    for key in ("text", "refused", "finish_reason", "prompt_tokens", "completion_tokens", "model"):
        assert result[key] == getattr(expected, key), key
    moderation, wanted = result["input_moderation"], expected.input_moderation
    assert wanted is not None and result["output_moderation"] is None
    assert (moderation["category"], moderation["flagged"]) == (wanted.category, wanted.flagged)
    assert moderation["scores"] == pytest.approx(wanted.scores, abs=1e-5)
    assert result["finish_reason"] in ("length", "stop", "input_flagged")
    assert result["completion_tokens"] <= 5


def test_generate_checks_the_answer_every_n_tokens(
    capsys: pytest.CaptureFixture[str], demo_checkpoint: Path
) -> None:
    # The random demo model's answers are flagged at the default threshold: the first check,
    # after 3 tokens, stops the generation.
    code, result, _ = run_cli(
        capsys, "generate", "--model", str(demo_checkpoint), "--moderate-output",
        "--stream-check-tokens", "3", "--max-new-tokens", "20", "Tell me a joke",
    )  # fmt: skip
    assert code == 0
    assert result["finish_reason"] == "output_flagged" and result["text"] == ""
    assert result["completion_tokens"] == 3 and result["released_tokens"] == 0
    code, _, err = run_cli(
        capsys, "generate", "--model", str(demo_checkpoint), "--moderate-output",
        "--stream-check-tokens", "0", "Tell me a joke",
    )  # fmt: skip
    assert code == EXIT_USAGE and "stream_check_tokens" in err


def test_without_model_the_demo_is_used_and_said_so(tmp_path: Path) -> None:
    env = {"TMPDIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "moderation", "classify", "hi"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "demo model" in proc.stderr
    assert "demo" in json.loads(proc.stdout)["model"]


def test_a_missing_model_folder_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = main(["classify", "--model", str(tmp_path / "nowhere"), "hello"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert "checkpoint folder not found" in err


def test_an_unknown_policy_lists_the_builtin_ones_before_loading_a_model(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # The model folder does not exist: the policy is refused before any load is tried.
    code = main(["classify", "--model", str(tmp_path / "nowhere"), "--policy", "nope", "x"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "'nope'" in err and "paper" in err and "mistral-13" in err
    assert "checkpoint" not in err
    assert main(["serve", "--policy", "nope", "--model", str(tmp_path / "nowhere")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "'nope'" in err and "mistral-13, paper" in err


def test_the_demo_warning_is_printed_once_without_colour_when_redirected(
    tmp_path: Path,
) -> None:
    env = {"TMPDIR": str(tmp_path), "PATH": "/usr/bin:/bin", "FORCE_COLOR": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "moderation", "classify", "hi"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr  # one warning line
    assert "using the demo model" in proc.stderr and "serving" not in proc.stderr
    assert "\x1b[" not in proc.stderr


def test_colour_only_on_a_terminal_and_never_with_no_color(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Terminal:
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_colour(Terminal())
    assert not use_colour(object())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_colour(Terminal())


def test_readme_commands_run_from_the_venv() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    lines = [line.strip() for line in readme.splitlines()]
    # A bare `python` is the system's, without torch: the README uses the venv or make.
    assert not [line for line in lines if line.startswith("python -m")]
    assert any(line.startswith("make demo") for line in lines)
