"""The README's settings reference, generated from the declarations in `settings` (flag,
environment variable, default, bounds, help), so that it cannot drift from them.

`make settings-doc` (`python -m moderation.serving.settings_doc README.md`) rewrites the block
between the markers; tests/test_settings_doc.py fails when the committed block is stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

from moderation.serving.settings import DECLARATIONS, OPTIONS, describe_default

BEGIN = (
    "<!-- settings reference: generated from moderation/serving/settings.py by "
    "`make settings-doc`; do not edit by hand -->"
)
END = "<!-- end of the settings reference -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def reference() -> str:
    """The settings as a Markdown table, in declaration order."""
    lines = [
        "| Option | Environment variable | Default | Bounds | What it sets |",
        "|---|---|---|---|---|",
    ]
    for name, (flag, env) in OPTIONS.items():
        option = DECLARATIONS[name]
        lines.append(
            f"| `{flag}` | `{env}` | `{_cell(describe_default(name))}` "
            f"| {_cell(option.bounds() or '')} | {_cell(option.help)} |"
        )
    return "\n".join(lines)


def updated(readme: str) -> str:
    """`readme` with the block between the markers replaced by the current reference."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the settings reference markers are missing: {BEGIN!r} ... {END!r}")
    return f"{readme[: start + len(BEGIN)]}\n{reference()}\n{readme[end:]}"


def main(argv: list[str]) -> int:
    """Rewrite the settings reference of each Markdown file named."""
    for name in argv:
        path = Path(name)
        path.write_text(updated(path.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
