"""The README's settings reference is generated from the settings' declarations and fresh."""

from __future__ import annotations

from pathlib import Path

from moderation.serving.settings import OPTIONS
from moderation.serving.settings_doc import BEGIN, END, reference, updated

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_settings_reference_is_fresh() -> None:
    text = README.read_text(encoding="utf-8")
    assert updated(text) == text, (
        "the README's settings reference is stale: run `make settings-doc` and commit README.md"
    )


def test_the_reference_has_every_setting_with_its_bounds() -> None:
    table = reference()
    for flag, env in OPTIONS.values():
        assert f"| `{flag}` | `{env}` |" in table
    assert "| `--port` | `MODERATION_PORT` | `50051` | in [1, 65535] |" in table
    assert "one of reject, split" in table
    rewritten = updated(f"intro\n{BEGIN}\nold table\n{END}\noutro\n")
    assert rewritten == f"intro\n{BEGIN}\n{table}\n{END}\noutro\n"
