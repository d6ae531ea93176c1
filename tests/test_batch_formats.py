"""`moderation batch` on JSONL (gzip by extension) as well as CSV: keys copied unchanged,
the added fields typed, and the journal's guarantee kept (a gzip output resumed after a crash
is byte for byte the uninterrupted run's)."""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from moderation.api.remote import Outcome
from moderation.cli import main
from moderation.core.decision import ClassifyItem
from moderation.core.policy import Policy
from moderation.exit_codes import EXIT_FAILED_ROWS, EXIT_OK, EXIT_USAGE
from moderation.jobs.batch import BatchJob, Progress, UsageError, run
from moderation.jobs.formats import CSV, JSONL, format_of
from moderation.jobs.scoring import LocalScorer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SAMPLES = DATA / "openai-moderation" / "samples-1680.jsonl.gz"


def job(inp: Path, out: Path, **kw: Any) -> BatchJob:
    defaults: dict[str, Any] = dict(
        text_column="text", prompt_column=None, role="input", policy=None, threshold=None,
        encoding="utf-8", delimiter=",", batch_size=3, resume=False, escape_formulas=False,
    )  # fmt: skip
    defaults.update(kw)
    return BatchJob(input=str(inp), output=str(out), **defaults)


def jsonl(path: Path) -> list[dict[str, Any]]:
    opener: Any = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def scorer(demo_runtime: Any) -> LocalScorer:
    return LocalScorer(demo_runtime)


def test_format_follows_the_name() -> None:
    assert format_of("a.jsonl") == format_of("a.ndjson.gz") == format_of("-", "b.JSONL") == JSONL
    assert format_of("a.csv") == format_of("a.csv.gz") == format_of("-", "-") == CSV


def test_jsonl_keys_unchanged_and_added_fields_typed(tmp_path: Path, scorer: LocalScorer) -> None:
    inp = tmp_path / "in.jsonl"
    lines = [
        {"id": 1, "text": "hello there", "meta": {"lang": "en"}, "label": None},
        {"id": 2, "text": ""},  # empty text: an error row
        {"id": 3, "label": "x"},  # no text at all: an error row
        {"id": 4, "text": "what a day", "label": 0, "late": [1, 2]},  # a key the first lacked
    ]
    inp.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    progress = run(job(inp, out), scorer)
    assert (progress.rows, progress.failed) == (4, 2)
    rows = jsonl(out)
    assert [r["id"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["meta"] == {"lang": "en"} and rows[0]["label"] is None
    assert rows[3]["late"] == [1, 2] and rows[3]["label"] == 0
    assert "text" not in rows[2] and rows[2]["error"] == "missing column 'text' in this row"
    assert rows[1]["error"] == "text: must not be empty" and rows[1]["flagged"] is None
    ok = rows[0]
    assert ok["error"] is None and isinstance(ok["flagged"], bool)
    assert isinstance(ok["score_acceptable"], float) and isinstance(ok["category"], str)
    assert list(ok)[:4] == ["id", "text", "meta", "label"]  # input keys first, in order


def test_csv_in_jsonl_out_and_back(tmp_path: Path, scorer: LocalScorer) -> None:
    inp = tmp_path / "in.csv"
    inp.write_text("id,text\n1,hello\n2,good morning\n", encoding="utf-8")
    as_jsonl = tmp_path / "out.jsonl.gz"
    run(job(inp, as_jsonl), scorer)
    rows = jsonl(as_jsonl)
    assert [(r["id"], r["text"]) for r in rows] == [("1", "hello"), ("2", "good morning")]
    source = tmp_path / "in.ndjson"
    source.write_text('{"id": 5, "text": "yo", "n": null, "tags": ["a"]}\n{"text": "b", "x": 1}\n')
    as_csv = tmp_path / "out.csv"
    run(job(source, as_csv), scorer)
    with open(as_csv, newline="", encoding="utf-8") as f:
        back = list(csv.reader(f))
    assert back[0][:4] == ["id", "text", "n", "tags"]
    assert back[1][:4] == ["5", "yo", "", '["a"]'] and back[1][5] in ("true", "false")
    assert back[2][:5] == ["", "b", "", "", "x=1"]  # a key the header lacked, as a long row


class _Crash(Exception):
    pass


class _CrashingScorer:
    """Scores `calls` chunks, then fails as a killed process would stop."""

    def __init__(self, inner: LocalScorer, calls: int):
        self.inner, self.calls = inner, calls

    def policy(self, name: str | None) -> Policy:
        return self.inner.policy(name)

    def score(self, items: Sequence[ClassifyItem]) -> list[Outcome]:
        if self.calls == 0:
            raise _Crash
        self.calls -= 1
        return self.inner.score(items)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("name", ["out.jsonl.gz", "out.csv.gz", "out.jsonl"])
def test_resume_after_a_crash_gives_the_uninterrupted_bytes(
    tmp_path: Path, scorer: LocalScorer, name: str
) -> None:
    inp = tmp_path / "in.jsonl.gz"
    with gzip.open(inp, "wt", encoding="utf-8") as f:
        for i in range(11):
            f.write(json.dumps({"n": i, "text": f"comment {i}", "x": [i]}) + "\n")
    whole = tmp_path / ("whole-" + name)
    run(job(inp, whole), scorer)
    out = tmp_path / name
    with pytest.raises(_Crash):
        run(job(inp, out), _CrashingScorer(scorer, 2))  # type: ignore[arg-type]
    assert Progress.load(Path(str(out) + ".progress")).rows == 6
    with open(out, "ab") as f:
        f.write(b"half a row after the last commit")
    progress = run(job(inp, out, resume=True), scorer)
    assert progress.rows == 11
    assert out.read_bytes() == whole.read_bytes()
    assert [r["n"] for r in (jsonl(out) if "jsonl" in name else [])] == (
        list(range(11)) if "jsonl" in name else []
    )


def test_broken_jsonl_is_a_usage_error(tmp_path: Path, scorer: LocalScorer) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"text": "fine"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(UsageError, match="line 2 is not a JSON object"):
        run(job(inp, tmp_path / "o.jsonl"), scorer)
    inp.write_text("not json\n", encoding="utf-8")
    with pytest.raises(UsageError, match="line 1 is not JSON"):
        run(job(inp, tmp_path / "o2.jsonl"), scorer)
    bad = tmp_path / "in.jsonl.gz"
    bad.write_bytes(b"not gzip at all")
    assert main(["batch", str(bad), "-o", str(tmp_path / "o3.jsonl"), "--text-column", "text"]) == (
        EXIT_USAGE
    )


@pytest.mark.skipif(not SAMPLES.exists(), reason="the OpenAI moderation samples are not in "
                    "../shared/data")  # fmt: skip
def test_the_openai_samples_file_scores_as_is(
    tmp_path: Path, demo_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Its first 40 lines, as they are in the file (gzip JSONL, labels as numbers).
    with gzip.open(SAMPLES, "rt", encoding="utf-8") as f:
        head = [next(f) for _ in range(40)]
    inp = tmp_path / "samples.jsonl.gz"
    with gzip.open(inp, "wt", encoding="utf-8") as f:
        f.writelines(head)
    out = tmp_path / "scored.jsonl"
    code = main(["batch", str(inp), "-o", str(out), "--text-column", "prompt",
                 "--model", str(demo_checkpoint), "--max-failed-rows", "10%"])  # fmt: skip
    assert code in (EXIT_OK, EXIT_FAILED_ROWS), capsys.readouterr().err
    rows = jsonl(out)
    assert len(rows) == 40
    for given, scored in zip(head, rows, strict=True):
        original = json.loads(given)
        assert {k: scored[k] for k in original} == original  # every label kept, as a number
    assert sum(r["error"] is None for r in rows) >= 36


def test_jsonl_to_stdout(tmp_path: Path, demo_checkpoint: Path, capsys: Any) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"text": "hi"}\n', encoding="utf-8")
    code = main(["batch", str(inp), "-o", "-", "--text-column", "text",
                 "--model", str(demo_checkpoint)])  # fmt: skip
    assert code == EXIT_OK
    row = json.loads(io.StringIO(capsys.readouterr().out).readline())
    assert row["text"] == "hi" and isinstance(row["flagged"], bool)
