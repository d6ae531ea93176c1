"""Progress on a timer (a line every interval whatever the chunk size), and a batch stopped by
SIGTERM that says how to resume."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from moderation.api.remote import Outcome
from moderation.core.decision import ClassifyItem
from moderation.core.policy import Policy
from moderation.jobs.batch import BatchJob, run
from moderation.jobs.progress import ProgressReporter
from moderation.jobs.scoring import LocalScorer
from tests.servers import REPO


class _SlowScorer:
    """Holds its first chunk until the reporter has written two lines: a chunk longer than
    the interval must still get its lines."""

    def __init__(self, inner: LocalScorer, stream: io.StringIO):
        self.inner, self.stream = inner, stream
        self.lines_during_first_chunk = 0
        self.calls = 0

    def policy(self, name: str | None) -> Policy:
        return self.inner.policy(name)

    def score(self, items: Sequence[ClassifyItem]) -> list[Outcome]:
        self.calls += 1
        if self.calls == 1:
            deadline = time.monotonic() + 30
            while self.stream.getvalue().count("\n") < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            self.lines_during_first_chunk = self.stream.getvalue().count("\n")
        return self.inner.score(items)

    def close(self) -> None:
        pass


def test_lines_come_on_a_timer_while_a_chunk_runs(tmp_path: Path, demo_runtime: object) -> None:
    inp = tmp_path / "in.csv"
    inp.write_text("text\n" + "".join(f"row {i}\n" for i in range(6)))
    stream = io.StringIO()
    reporter = ProgressReporter(stream, name="batch", interval=0.05, tty=False)
    scorer = _SlowScorer(LocalScorer(demo_runtime), stream)  # type: ignore[arg-type]
    job = BatchJob(
        input=str(inp), output=str(tmp_path / "o.csv"), text_column="text", prompt_column=None,
        role="input", policy=None, threshold=None, encoding="utf-8", delimiter=",",
        batch_size=100, resume=False, escape_formulas=False,
    )  # fmt: skip
    run(job, scorer, reporter=reporter)
    assert scorer.lines_during_first_chunk >= 2  # one chunk, yet lines while it ran
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("batch: 0 rows (")
    assert lines[-1].startswith("batch: 6 rows (100%)")  # the last line says where it ended
    assert not any(t.name == "progress" and t.is_alive() for t in threading.enumerate())


def test_tick_repeats_the_latest_state_with_this_runs_rate() -> None:
    now = [0.0]
    stream = io.StringIO()
    reporter = ProgressReporter(stream, name="eval", unit="texts", interval=1, tty=False,
                                clock=lambda: now[0])  # fmt: skip
    reporter.started(0)
    now[0] = 4.0
    reporter.tick()  # nothing committed yet: the job is alive all the same
    assert stream.getvalue() == "eval: 0 texts (0%), 0.0 texts/s\n"


def test_sigterm_says_how_to_resume(tmp_path: Path) -> None:
    inp = tmp_path / "in.csv"
    inp.write_text("text\n" + "".join(f"comment number {i}\n" for i in range(3000)))
    out = tmp_path / "out.csv"
    journal = Path(str(out) + ".progress")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moderation", "batch", str(inp), "-o", str(out),
         "--text-column", "text", "--batch-size", "4", "--progress-interval", "0"],
        cwd=REPO, env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not journal.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted (SIGTERM)" in err and "--resume" in err
    assert "Traceback" not in err
