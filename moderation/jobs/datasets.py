"""Labelled moderation sets for `moderation eval`: the two public ones and any CSV.

Gold labels are in the paper's terms: "acceptable", one of the paper's three categories, or
"unsafe" when a set says a text is harmful without a category the paper has.

- OpenAI moderation samples (`samples-1680.jsonl.gz`, MIT; https://github.com/openai/moderation-api-release):
  binary labels S (sexual), H (hate), V (violence), HR (harassment), SH (self-harm),
  S3 (sexual/minors), H2 (hate/threatening), V2 (violence/graphic). Mapping: S3 ->
  illegal_activities (child abuse); H, H2, HR, V, V2, SH -> hateful_harassing_violent (the paper
  lists discrimination, self-harm, bullying and violence there); S alone -> "unsafe" (the paper
  has no sexual-content category: it counts as flagged, in no category). No label -> acceptable.
- XSTest (`xstest_prompts.csv`, CC-BY-4.0; https://github.com/paul-rottger/exaggerated-safety):
  prompts labelled safe/unsafe -> acceptable/unsafe.
- Any CSV: a text column and a label column holding "acceptable"/"safe"/"0"/"false", a
  category id of the paper or of the policy, or "unsafe"/"1"/"true".
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from moderation.core.policy import ACCEPTABLE_ID, PAPER_CATEGORY_IDS

UNSAFE = "unsafe"
_SAFE_WORDS = {"acceptable", "safe", "0", "false", "no", "not moderated"}
_UNSAFE_WORDS = {"unsafe", "1", "true", "yes", "flagged"}

OPENAI_MAPPING = {
    "S3": "illegal_activities",
    "H": "hateful_harassing_violent",
    "H2": "hateful_harassing_violent",
    "HR": "hateful_harassing_violent",
    "V": "hateful_harassing_violent",
    "V2": "hateful_harassing_violent",
    "SH": "hateful_harassing_violent",
    "S": UNSAFE,
}


class DatasetError(ValueError):
    """A labelled file cannot be read; the message names the file and the line."""


@dataclass(frozen=True)
class Example:
    text: str
    label: str  # "acceptable", a paper category id, or "unsafe"

    @property
    def unsafe(self) -> bool:
        return self.label != ACCEPTABLE_ID


def read_openai(path: str | Path) -> Iterator[Example]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row["prompt"]
            except (ValueError, KeyError) as exc:
                raise DatasetError(f"{path}:{n}: not an OpenAI moderation sample ({exc})") from exc
            # Paper categories in priority order: a child-abuse sample is illegal first.
            labels = [OPENAI_MAPPING[k] for k in OPENAI_MAPPING if row.get(k) == 1]
            paper = [lab for lab in labels if lab in PAPER_CATEGORY_IDS]
            label = paper[0] if paper else (UNSAFE if labels else ACCEPTABLE_ID)
            yield Example(text, label)


def read_xstest(path: str | Path) -> Iterator[Example]:
    yield from read_csv(path, text_column="prompt", label_column="label")


def read_csv(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    categories: tuple[str, ...] = (),
) -> Iterator[Example]:
    """Rows of a labelled CSV; `categories` are extra valid label ids (a policy's)."""
    known = set(PAPER_CATEGORY_IDS) | set(categories)
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        for column in (text_column, label_column):
            if column not in (reader.fieldnames or []):
                raise DatasetError(f"{path}: no column {column!r}; columns: {reader.fieldnames}")
        for n, row in enumerate(reader, 2):
            raw = (row.get(label_column) or "").strip()
            word = raw.lower()
            if word in _SAFE_WORDS:
                label = ACCEPTABLE_ID
            elif word in _UNSAFE_WORDS:
                label = UNSAFE
            elif raw in known:
                label = raw
            else:
                raise DatasetError(f"{path}:{n}: unknown label {raw!r}")
            yield Example(row.get(text_column) or "", label)


def read_dataset(
    path: str | Path, fmt: str = "auto", *, text_column: str = "text", label_column: str = "label"
) -> list[Example]:
    """Read by format ("openai", "xstest", "csv"), or guessed from the file name."""
    name = Path(path).name
    if fmt == "auto":
        fmt = "openai" if ".jsonl" in name else "xstest" if name.startswith("xstest") else "csv"
    if fmt == "openai":
        return list(read_openai(path))
    if fmt == "xstest":
        return list(read_xstest(path))
    if fmt == "csv":
        return list(read_csv(path, text_column=text_column, label_column=label_column))
    raise DatasetError(f"unknown format {fmt!r}; use openai, xstest or csv")
