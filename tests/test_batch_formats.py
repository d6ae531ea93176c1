"""`moderation batch` on JSONL (gzip by extension) as well as CSV: keys copied unchanged,
the added fields typed, and the journal's guarantee kept (a gzip output resumed after a crash
is byte for byte the uninterrupted run's)."""

from __future__ import annotations

import csv
import gzip
import io
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from moderation.api.remote import Outcome
from moderation.cli import main
from moderation.core.decision import ClassifyItem
from moderation.core.policy import Policy
from moderation.exit_codes import EXIT_FAILED_ROWS, EXIT_OK, EXIT_USAGE
from moderation.jobs import batch
from moderation.jobs.batch import BatchJob, Interrupted, Progress, UsageError, run
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
    assert back[0][:6] == ["id", "text", "n", "tags", "x", "category"]  # every key a column
    assert back[1][:5] == ["5", "yo", "", '["a"]', ""] and back[1][6] in ("true", "false")
    assert back[2][:5] == ["", "b", "", "", "1"]


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


# ------------------------------------- JSONL rows whose keys differ, in a CSV output (#19)


class _Interrupting(_CrashingScorer):
    """Scores `calls` chunks, then stops as SIGTERM does (the CLI's `Interrupted`)."""

    def score(self, items: Sequence[ClassifyItem]) -> list[Outcome]:
        if self.calls == 0:
            raise Interrupted(signal.SIGTERM)
        return super().score(items)


def cli_scorer(monkeypatch: pytest.MonkeyPatch, scorer: Any) -> None:
    """The CLI scores with `scorer` (the session's demo runtime) instead of loading a model."""
    monkeypatch.setattr(batch, "make_scorer", lambda ns, files=(): scorer)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    opener: Any = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def read_csv_rows(path: Path) -> list[list[str]]:
    opener: Any = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


VARYING = [
    {"id": 1, "text": "hello there"},
    {"text": "good morning", "late": {"x": [1, "é"]}, "id": 2},  # a new key, another order
    {"id": 3, "note": 'a,"quoted"\nline'},  # no text: its row's error, its keys still copied
    {"late": None, "text": "what a day", "score": 5.5, "flag": False},
    {},
    {"note": "=1+1", "text": "bye", "id": "7"},
]


def test_jsonl_keys_the_first_row_lacks_get_columns_of_their_own_in_csv(
    tmp_path: Path, scorer: LocalScorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.csv"
    write_jsonl(inp, VARYING)
    cli_scorer(monkeypatch, scorer)
    args = ["batch", str(inp), "-o", str(out), "--text-column", "text", "--batch-size", "2"]
    assert main([*args, "--max-failed-rows", "2"]) == EXIT_OK
    header, *lines = read_csv_rows(out)
    keys = ["id", "text", "late", "note", "score", "flag"]  # every key, in first-seen order
    assert header[: len(keys)] == keys and header[len(keys)] == "category"
    assert len(lines) == len(VARYING)
    for given, line in zip(VARYING, lines, strict=True):
        assert len(line) == len(header)  # nothing shifted into the added columns
        cells = dict(zip(header, line, strict=True))
        # Every value under its own key: text as is, anything else as its JSON.
        for key in keys:
            value = given.get(key)
            expected = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            assert cells[key] == ("" if value is None else expected), (key, given)
        if "text" in given:
            assert cells["error"] == "" and cells["flagged"] in ("true", "false")
        else:
            assert cells["error"] == "missing column 'text' in this row"
    assert json.loads(dict(zip(header, lines[1], strict=True))["late"]) == {"x": [1, "é"]}


@pytest.mark.parametrize("name", ["out.csv", "out.csv.gz"])
def test_an_interrupted_csv_of_varying_jsonl_resumes_to_the_same_bytes(
    tmp_path: Path,
    scorer: LocalScorer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
) -> None:
    inp = tmp_path / "in.jsonl.gz"
    rows = [{"n": i, "text": f"comment {i}", f"k{i % 3}": i} for i in range(10)]
    rows.insert(8, {"text": "a key only this late row has", "late": [1]})  # after the stop
    write_jsonl(inp, rows)
    whole, out = tmp_path / ("whole-" + name), tmp_path / name
    args = ["batch", str(inp), "--text-column", "text", "--batch-size", "3"]
    cli_scorer(monkeypatch, scorer)
    assert main([*args, "-o", str(whole)]) == EXIT_OK
    cli_scorer(monkeypatch, _Interrupting(scorer, 2))
    assert main([*args, "-o", str(out)]) == 128 + signal.SIGTERM
    assert "--resume" in capsys.readouterr().err
    journal = Progress.load(Path(str(out) + ".progress"))
    assert journal.rows == 6 and journal.columns == ["n", "text", "k0", "k1", "k2", "late"]
    with open(out, "ab") as f:
        f.write(b"half a row after the last commit")
    cli_scorer(monkeypatch, scorer)
    assert main([*args, "-o", str(out), "--resume"]) == EXIT_OK
    assert "11 rows: 11 scored, 0 failed" in capsys.readouterr().err
    assert out.read_bytes() == whole.read_bytes()
    header, *lines = read_csv_rows(out)
    assert header[6] == "category" and all(len(line) == len(header) for line in lines)
    assert lines[8][5] == "[1]"  # the late key's value under its own column


def test_a_key_the_input_gains_after_the_job_began_is_its_rows_error(
    tmp_path: Path,
    scorer: LocalScorer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A CSV output's header is written once: rows appended to the input with a new key, then
    resumed, cannot get a column. Each is an error row naming its line and the key, its other
    keys copied under their columns; no row is dropped, no cell shifted."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.csv"
    write_jsonl(inp, [{"id": i, "text": f"row {i}"} for i in range(6)])
    args = ["batch", str(inp), "-o", str(out), "--text-column", "text", "--batch-size", "3"]
    cli_scorer(monkeypatch, _Interrupting(scorer, 1))
    assert main(args) == 128 + signal.SIGTERM
    with open(inp, "a", encoding="utf-8") as f:
        f.write(json.dumps({"id": 6, "text": "new", "lang": "en", "x" * 5000: 1}) + "\n")
        f.write(json.dumps({"text": "old keys only", "id": 7}) + "\n")
    cli_scorer(monkeypatch, scorer)
    assert main([*args, "--resume"]) == EXIT_FAILED_ROWS
    assert "8 rows: 7 scored, 1 failed" in capsys.readouterr().err
    header, *lines = read_csv_rows(out)
    assert header[:3] == ["id", "text", "category"] and len(lines) == 8
    assert all(len(line) == len(header) for line in lines)
    gained = dict(zip(header, lines[6], strict=True))
    assert (gained["id"], gained["text"]) == ("6", "new")
    assert (
        gained["error"].startswith("line 7: key(s) 'lang', 'xxxx")
        and "--overwrite" in gained["error"]
    )
    assert len(gained["error"]) < 400  # the 5,000-character key is quoted, not copied
    assert dict(zip(header, lines[7], strict=True))["error"] == ""


def test_a_later_jsonl_key_that_the_output_adds_is_refused(
    tmp_path: Path, scorer: LocalScorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file: refused before scoring, as a first row's would be (exit 2). Standard input, which
    is read once, with a JSONL output: that row's error (its `flagged` would be overwritten)."""
    rows = [{"text": "hi"}, {"text": "there", "flagged": "by a human"}]
    inp = tmp_path / "in.jsonl"
    write_jsonl(inp, rows)
    cli_scorer(monkeypatch, scorer)
    out = tmp_path / "out.jsonl"
    assert main(["batch", str(inp), "-o", str(out), "--text-column", "text"]) == EXIT_USAGE
    assert not out.exists()
    stdin = io.TextIOWrapper(io.BytesIO(inp.read_bytes()))
    monkeypatch.setattr(sys, "stdin", stdin)
    progress = run(job("-", out), scorer)  # type: ignore[arg-type]
    assert (progress.rows, progress.failed) == (2, 1)
    scored = jsonl(out)
    assert scored[0]["error"] is None
    assert scored[1]["error"].startswith("line 2: key(s) 'flagged' are fields the output adds")


def test_a_refused_key_leaves_the_rows_other_values_in_place(
    tmp_path: Path, scorer: LocalScorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Standard input, JSONL output: the refused key is dropped, not a value equal to its name
    (the row's text here), which would shift the row's other cells."""
    inp = tmp_path / "in.jsonl"
    write_jsonl(inp, [{"text": "hi", "note": "a"}, {"text": "flagged", "note": "b", "flagged": 1}])
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(inp.read_bytes())))
    out = tmp_path / "out.jsonl"
    progress = run(job("-", out), scorer)  # type: ignore[arg-type]
    assert (progress.rows, progress.failed) == (2, 1)
    refused = jsonl(out)[1]
    assert (refused["text"], refused["note"]) == ("flagged", "b"), refused
    assert refused["error"].startswith("line 2: key(s) 'flagged'"), refused
