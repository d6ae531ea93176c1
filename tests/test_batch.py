"""`moderation batch` on awkward CSV, resumed after a real SIGKILL, and against a real server
that restarts mid-run."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from moderation.api.remote import RemoteOptions, RemoteScorer
from moderation.cli import main
from moderation.exit_codes import EXIT_FAILED_ROWS, EXIT_OK, EXIT_USAGE
from moderation.jobs.batch import BatchJob, Progress, UsageError, run
from moderation.jobs.progress import ProgressReporter
from moderation.jobs.scoring import LocalScorer
from tests.servers import REPO, free_port, start_subprocess_server, wait_serving

AWKWARD = (
    "\ufeffid,text,note\r\n"  # a UTF-8 byte-order mark
    '1,"Hello, world",plain\r\n'
    '2,"multi\nline ""quoted"" text",newline\r\n'
    "3,,empty text\r\n"
    '4,=HYPERLINK("http://x")+1,formula\r\n'
    "5\r\n"  # a row missing fields
    '6,"' + "very long " * 3000 + '",long\r\n'
    "7,Ça va? 日本語 🙂,unicode\r\n"
    "8,   ,blank\r\n"
)


def job(inp: Path | str, out: Path | str, **kw: Any) -> BatchJob:
    defaults: dict[str, Any] = dict(
        text_column="text", prompt_column=None, role="input", policy=None, threshold=None,
        encoding="utf-8-sig", delimiter=",", batch_size=3, resume=False, escape_formulas=False,
    )  # fmt: skip
    defaults.update(kw)
    return BatchJob(input=str(inp), output=str(out), **defaults)


def read(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def scorer(demo_runtime: Any) -> LocalScorer:
    return LocalScorer(demo_runtime)


def test_awkward_csv_gives_one_row_per_input_row_in_order(
    tmp_path: Path, scorer: LocalScorer
) -> None:
    inp = tmp_path / "in.csv"
    inp.write_bytes(AWKWARD.encode("utf-8"))
    out = tmp_path / "out.csv"
    progress = run(job(inp, out), scorer)
    rows = read(out)
    assert [r["id"] for r in rows] == ["1", "2", "3", "4", "5", "6", "7", "8"]
    assert progress.rows == 8
    assert rows[1]["text"] == 'multi\nline "quoted" text'  # copied unchanged
    assert rows[3]["text"] == '=HYPERLINK("http://x")+1'
    assert rows[5]["text"].startswith("very long very long")
    assert rows[6]["text"] == "Ça va? 日本語 🙂"
    errors = {r["id"]: r["error"] for r in rows}
    assert errors["3"] == "text: must not be empty"
    assert errors["8"] == "text: must not be empty"
    assert "missing column 'text'" in errors["5"]
    assert errors["1"] == errors["2"] == errors["4"] == errors["7"] == ""
    scored = rows[0]
    assert scored["flagged"] in ("true", "false") and scored["category"]
    score_columns = [c for c in scored if c.startswith("score_")]
    assert score_columns == [
        "score_illegal_activities", "score_hateful_harassing_violent", "score_unqualified_advice",
        "score_acceptable",
    ]  # fmt: skip
    assert sum(float(scored[c]) for c in score_columns) == pytest.approx(1.0, abs=1e-5)
    assert progress.failed == 3
    # A finished job's journal stays, marked complete: --resume then has nothing to do.
    assert Progress.load(Path(str(out) + ".progress")).complete


def test_a_too_long_text_is_a_row_error_not_a_failed_job(tmp_path: Path, demo_runtime: Any) -> None:
    from moderation.core.classifier import Classifier
    from moderation.core.limits import ModelLimits
    from moderation.core.planning import Planner

    planner = Planner(
        demo_runtime.tokenizer, ModelLimits.of(demo_runtime.engine), max_text_tokens=64
    )
    short = Classifier(demo_runtime.engine, demo_runtime.tokenizer, planner, model_id="d")
    runtime = type(demo_runtime)(**{**demo_runtime.__dict__, "classifier": short})
    inp = tmp_path / "in.csv"
    inp.write_text("text\nshort one\n" + "word " * 500 + "\nanother\n")
    out = tmp_path / "out.csv"
    run(job(inp, out), LocalScorer(runtime))
    errors = [r["error"] for r in read(out)]
    assert errors[0] == "" and errors[2] == ""
    assert "exceed the limit of 64" in errors[1]


def test_escape_formulas_and_other_delimiters(tmp_path: Path, scorer: LocalScorer) -> None:
    inp = tmp_path / "in.tsv"
    inp.write_text("text\tn\n=1+1\t1\n@SUM(A1)\t2\nplain\t3\n", encoding="latin-1")
    out = tmp_path / "out.tsv"
    run(job(inp, out, delimiter="\t", escape_formulas=True, encoding="latin-1"), scorer)
    with open(out, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [r["text"] for r in rows] == ["'=1+1", "'@SUM(A1)", "plain"]


def test_missing_text_column_is_a_usage_error_naming_the_columns(
    tmp_path: Path, scorer: LocalScorer
) -> None:
    inp = tmp_path / "in.csv"
    inp.write_text("id,body\n1,hi\n")
    with pytest.raises(UsageError, match="no column 'text'; the columns are: id, body"):
        run(job(inp, tmp_path / "out.csv"), scorer)
    with pytest.raises(UsageError, match="--resume"):
        run(job(inp, "-", resume=True), scorer)


def test_resume_after_rows_written_but_not_committed(tmp_path: Path, scorer: LocalScorer) -> None:
    inp = tmp_path / "in.csv"
    inp.write_text("text\n" + "".join(f"row {i}\n" for i in range(20)))
    whole = tmp_path / "whole.csv"
    run(job(inp, whole), scorer)
    # A crash after a commit: the journal says 9 rows; OUT also holds half-written rows.
    out = tmp_path / "out.csv"
    run(job(inp, out), scorer)

    lines = out.read_bytes().split(b"\r\n")
    committed = b"\r\n".join(lines[:10]) + b"\r\n"  # header + 9 rows
    Progress(rows=9, output_bytes=len(committed)).save(Path(str(out) + ".progress"))
    # Longer than the rows still to come: only truncating to the journal's length removes it.
    out.write_bytes(committed + b"row 9,half-writ" + b"x" * 10_000)
    run(job(inp, out, resume=True), scorer)
    assert out.read_bytes() == whole.read_bytes()


def _progress_rows(path: Path) -> int:
    import json

    try:
        return int(json.loads(path.read_text())["rows"])
    except (OSError, ValueError, KeyError):
        return 0


def test_sigkill_part_way_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    inp = tmp_path / "in.csv"
    with open(inp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        for i in range(400):
            w.writerow([i, f"comment {i}: " + ('a, "quoted"\nline' if i % 7 == 0 else "plain")])
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    base = [
        sys.executable,
        "-m",
        "moderation",
        "batch",
        str(inp),
        "--text-column",
        "text",
        "--batch-size",
        "4",
    ]
    whole = tmp_path / "whole.csv"
    subprocess.run(
        [*base, "-o", str(whole)], cwd=REPO, env=env, check=False, capture_output=True, timeout=600
    )
    out = tmp_path / "out.csv"
    journal = Path(str(out) + ".progress")
    proc = subprocess.Popen([*base, "-o", str(out)], cwd=REPO, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _progress_rows(journal) < 60 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _progress_rows(journal)
    assert 0 < killed_at < 400, killed_at
    done = subprocess.run(
        [*base, "-o", str(out), "--resume"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "400 rows: 400 scored, 0 failed" in done.stderr
    assert out.read_bytes() == whole.read_bytes()


def test_stdin_to_stdout(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "moderation", "batch", "-", "-o", "-", "--text-column", "t"],
        input="t,n\nhello,1\n,2\n", cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip
    assert proc.returncode == EXIT_FAILED_ROWS  # one row failed
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert [r["n"] for r in rows] == ["1", "2"]
    assert rows[1]["error"] == "text: must not be empty"
    assert "2 rows: 1 scored, 1 failed" in proc.stderr


def test_remote_mode_survives_a_server_restart(tmp_path: Path, scorer: LocalScorer) -> None:
    inp = tmp_path / "in.csv"
    inp.write_text("text\n" + "".join(f"remote row {i}\n" for i in range(120)) + "\n")
    local = tmp_path / "local.csv"
    run(job(inp, local, batch_size=8), scorer)
    port = free_port()
    env = {"TMPDIR": str(tmp_path)}
    server = start_subprocess_server(port, env=env)
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(grpc.insecure_channel(address))
        remote = RemoteScorer(
            RemoteOptions(targets=(address,), concurrency=4, chunk=4, backoff=0.2, retries=12)
        )
        out = tmp_path / "remote.csv"
        journal = Path(str(out) + ".progress")
        result: dict[str, Any] = {}
        worker = threading.Thread(
            target=lambda: result.update(p=run(job(inp, out, batch_size=8), remote))
        )
        worker.start()
        while _progress_rows(journal) < 24 and worker.is_alive():
            time.sleep(0.01)
        server.send_signal(signal.SIGKILL)  # the server dies mid-run ...
        server.wait()
        rows_at_kill = _progress_rows(journal)
        assert 0 < rows_at_kill < 120 and worker.is_alive()
        server = start_subprocess_server(port, env=env)  # ... and comes back on the same port
        worker.join(300)
        remote.close()
        assert not worker.is_alive() and "p" in result
    finally:
        server.kill()
    got, want = read(out), read(local)
    assert len(got) == len(want) == 121
    for g, w in zip(got, want, strict=True):
        assert (g["text"], g["category"], g["flagged"], g["error"]) == (
            w["text"],
            w["category"],
            w["flagged"],
            w["error"],
        )
        for key in g:
            if key.startswith("score_") and w[key]:
                assert float(g[key]) == pytest.approx(float(w[key]), abs=2e-6)


class NoScoring:
    """A scorer that must not be used: a finished job is not scored again."""

    def policy(self, name: str | None) -> Any:
        raise AssertionError("scored again")

    def score(self, items: Any) -> Any:
        raise AssertionError("scored again")

    def close(self) -> None:
        pass


def test_a_finished_job_resumed_scores_nothing_and_reports_the_earlier_outcome(
    tmp_path: Path, scorer: LocalScorer
) -> None:
    inp = tmp_path / "in.csv"
    inp.write_text("text\nhello\n\nworld\n")  # one empty cell: one failed row
    out = tmp_path / "out.csv"
    first = run(job(inp, out), scorer)
    assert (first.rows, first.failed, first.complete) == (3, 1, True)
    before = out.read_bytes()
    again = run(job(inp, out, resume=True), NoScoring())  # type: ignore[arg-type]
    assert (again.rows, again.failed, again.flagged) == (first.rows, first.failed, first.flagged)
    assert out.read_bytes() == before
    # Without --resume the job is refused (nothing overwritten); --overwrite starts it over
    # and writes the same file.
    with pytest.raises(UsageError, match=r"--resume .* or --overwrite"):
        run(job(inp, out), scorer)
    assert out.read_bytes() == before
    run(job(inp, out, overwrite=True), scorer)
    assert out.read_bytes() == before
    # Rows appended to the input since: --resume scores those, as one run of the whole would.
    with open(inp, "a") as f:
        f.write("more\nand more\n")
    grown = run(job(inp, out, resume=True), scorer)
    assert (grown.rows, grown.failed, grown.complete) == (5, 1, True)
    whole = tmp_path / "whole.csv"
    run(job(inp, whole), scorer)
    assert out.read_bytes() == whole.read_bytes()


def test_failed_rows_exit_4_unless_max_failed_rows_allows_them(
    tmp_path: Path, demo_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = tmp_path / "in.csv"
    inp.write_text("text\n" + "".join(f"row {i}\n" for i in range(9)) + "\n")
    out = tmp_path / "out.csv"
    base = ["batch", str(inp), "-o", str(out), "--text-column", "text", "--model",
            str(demo_checkpoint)]  # fmt: skip
    assert main(base) == EXIT_FAILED_ROWS
    assert "10 rows: 9 scored, 1 failed" in capsys.readouterr().err
    # The Job's retry of a finished shard: nothing scored (the output is not touched), and
    # the same outcome.
    written, mtime = out.read_bytes(), out.stat().st_mtime_ns
    assert main([*base, "--resume"]) == EXIT_FAILED_ROWS
    err = capsys.readouterr().err
    assert "already complete" in err and "10 rows: 9 scored, 1 failed" in err
    assert out.read_bytes() == written and out.stat().st_mtime_ns == mtime
    assert main([*base, "--resume", "--max-failed-rows", "1"]) == EXIT_OK
    assert main([*base, "--resume", "--max-failed-rows", "10%"]) == EXIT_OK
    assert main([*base, "--resume", "--max-failed-rows", "5%"]) == EXIT_FAILED_ROWS
    with pytest.raises(SystemExit):
        main([*base, "--max-failed-rows", "lots"])


def test_progress_lines_off_a_terminal_every_interval() -> None:
    now = [0.0]
    stream = io.StringIO()
    reporter = ProgressReporter(stream, name="batch", interval=5.0, clock=lambda: now[0])
    reporter.started(100, 0.25)  # resumed: 100 rows were done by an earlier run
    for step in range(1, 21):
        now[0] = step * 1.0
        reporter.update(100 + 10 * step, fraction=(100 + 10 * step) / 400)
    reporter.finish()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4  # at 5, 10, 15 and 20 s
    # This run's rate and share only: 250 rows left at 10 rows/s (not the earlier run's rows).
    assert lines[0] == "batch: 150 rows (38%), 10.0 rows/s, ETA 25s"
    assert lines[-1] == "batch: 300 rows (75%), 10.0 rows/s, ETA 10s"
    assert "\r" not in stream.getvalue()


def test_progress_bar_on_a_terminal() -> None:
    now = [0.0]
    stream = io.StringIO()
    reporter = ProgressReporter(stream, name="eval", unit="texts", tty=True, clock=lambda: now[0])
    reporter.update(0, fraction=0.0)
    now[0] = 2.0
    reporter.update(50, fraction=0.5)
    reporter.finish()
    text = stream.getvalue()
    assert text.startswith("\r[") and text.endswith("\n")
    assert "[" + "#" * 15 + "." * 15 + "] 50 texts (50%), 25.0 texts/s, ETA 2s" in text


def test_batch_off_a_terminal_prints_progress_lines(tmp_path: Path) -> None:
    inp = tmp_path / "in.csv"
    inp.write_text("text\n" + "".join(f"row {i}\n" for i in range(12)))
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "moderation", "batch", str(inp), "-o", str(tmp_path / "o.csv"),
         "--text-column", "text", "--batch-size", "2", "--progress-interval", "0.000001"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("batch: ")]
    assert lines and "rows/s" in lines[-1] and "12 rows (100%)" in lines[-1], proc.stderr
    assert "\r" not in proc.stderr


# ------------------------------------------------ issue #19: every byte kept


def test_an_unterminated_quote_stops_the_job_naming_its_line(
    tmp_path: Path, scorer: LocalScorer
) -> None:
    inp, out = tmp_path / "in.csv", tmp_path / "out.csv"
    inp.write_text('text,n\nfine,1\nalso fine,2\n"never closed,3\nlost,4\nlost too,5\n')
    with pytest.raises(UsageError, match="line 4: a quoted cell is never closed"):
        run(job(inp, out), scorer)
    rows = read(out)  # the rows before it are scored and committed, nothing merged
    assert [r["text"] for r in rows] == ["fine", "also fine"]
    assert all(r["category"] for r in rows)


def test_a_row_longer_than_the_header_is_that_rows_error(
    tmp_path: Path, scorer: LocalScorer
) -> None:
    inp, out = tmp_path / "in.csv", tmp_path / "out.csv"
    inp.write_text("text,n\nfine,1\nan, unquoted comma,2\nlast,3\n")
    progress = run(job(inp, out), scorer)
    assert (progress.rows, progress.failed) == (3, 1)
    rows = read(out)
    assert [r["text"] for r in rows] == ["fine", "an", "last"]
    assert "3 cells, the header has 2" in rows[1]["error"] and rows[1]["category"] == ""
    assert rows[0]["category"] and rows[2]["category"] and not rows[2]["error"]
    assert [r["n"] for r in rows] == ["1", " unquoted comma", "3"]  # nothing shifted


def test_invalid_utf8_names_its_line_and_the_rows_before_it_are_scored(
    tmp_path: Path, scorer: LocalScorer
) -> None:
    inp, out = tmp_path / "in.csv", tmp_path / "out.csv"
    good = "".join(f"row {i}\n" for i in range(100)).encode()
    inp.write_bytes(b"text\n" + good + b"bad \xff byte\n" + b"after\n")
    with pytest.raises(UsageError, match=r"line 102: not valid utf-8.*100 rows before it"):
        run(job(inp, out, batch_size=7), scorer)
    rows = read(out)
    assert len(rows) == 100 and rows[-1]["text"] == "row 99"
    assert all(r["category"] for r in rows)
    # Fixed, --resume scores the rest: the same file as one run of the fixed input.
    inp.write_bytes(b"text\n" + good + b"bad  byte\n" + b"after\n")
    run(job(inp, out, resume=True, batch_size=7), scorer)
    whole = tmp_path / "whole.csv"
    run(job(inp, whole, batch_size=7), scorer)
    assert out.read_bytes() == whole.read_bytes()


def test_inputs_are_checked_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import moderation.jobs.batch as batch_module

    def no_model(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(batch_module, "make_scorer", no_model)
    inp, out = tmp_path / "in.csv", tmp_path / "out.csv"
    base = ["batch", "-o", str(out), "--text-column", "text"]
    assert main([*base, str(tmp_path / "missing.csv")]) == EXIT_USAGE
    assert capsys.readouterr().err.strip().endswith("missing.csv: no such file")
    inp.write_text("body\nhi\n")
    assert main([*base, str(inp)]) == EXIT_USAGE
    assert "no column 'text'" in capsys.readouterr().err
    inp.write_text("text\nhi\n")
    thresholds = tmp_path / "t.json"
    thresholds.write_text("[" * 200_000 + "]" * 200_000)
    assert main([*base, str(inp), "--thresholds", str(thresholds)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "t.json is not valid JSON" in err and len(err.strip().splitlines()) == 1
    out.write_text("an earlier job's output\n")
    assert main([*base, str(inp)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert out.read_text() == "an earlier job's output\n"


def test_invalid_utf8_in_jsonl_names_its_line_and_the_rows_before_it_are_scored(
    tmp_path: Path, scorer: LocalScorer
) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    good = "".join(f'{{"text": "row {i}"}}\n' for i in range(30)).encode()
    inp.write_bytes(good + b'{"text": "bad \xff"}\n{"text": "after"}\n')
    with pytest.raises(UsageError, match=r"line 31: not valid utf-8.*30 rows before it"):
        run(job(inp, out, batch_size=7), scorer)
    assert len(out.read_text().splitlines()) == 30
