"""`moderation batch`: score a CSV or JSONL file, every row accounted for, resumable after a
crash. (CSV and JSONL, gzip-compressed or not, are `moderation.jobs.formats`' business: the
format follows the file name; what follows says "column" for a JSONL key too.)

Output: every input column unchanged, then `category`, `flagged`, `paper_category`, one
`score_<category id>` column per category of the policy (and `score_acceptable`), and `error`.
One output row per input row, in input order; a row that cannot be scored gets `error` set.

With `--messages-column` each cell of that column is a conversation, a JSON list of
{"role", "content"} messages whose last message is classified (as ClassifyRequest.messages);
the output then also has `context_tokens` and `context_messages_dropped`. A cell that is not
such a list is an error row like any other.

Resume protocol. Rows are scored in batches; after each batch the rows are appended to OUT,
OUT is flushed and fsynced, and then `OUT.progress` (JSON: input rows done, OUT's length in
bytes, running counts) is replaced atomically (write a temporary file, os.replace). A kill at
any moment leaves a progress file that describes a prefix of OUT; `--resume` truncates OUT to
that length, skips that many input rows and carries on, so the final file equals what one
uninterrupted run writes. When the job completes the progress file stays, marked complete:
`--resume` of a finished job scores nothing and reports the earlier outcome (a retried pod of a
finished shard costs seconds, not a pass over the shard).

Exit codes: 0 when done, also with up to `--max-failed-rows` failed rows (a count, or a
percentage of the rows such as `1%`; default 0); 4 (EXIT_FAILED_ROWS) when more rows failed:
the job ran to the end and rerunning it gives the same rows, so a Kubernetes Job should not
retry it (deploy/examples/batch maps 2 and 4 to FailIndex).

Reading: strict (CSV: `moderation.jobs.csv_input`; JSONL: `formats.JsonlReader`): an unreadable
line (an unterminated quote, an invalid byte, a JSONL line that is not an object) stops the job
with exit 2 naming the line, after scoring the rows before it; a CSV row longer than the header
is that row's error. Nothing is overwritten: an existing OUT or journal needs `--resume`
(continue it) or `--overwrite` (start over), else exit 2. The input (file, columns) and the
thresholds file are checked before the model loads.

CSV injection: input columns are copied unchanged (the contract); texts that start with
`=`, `+`, `-` or `@` can run as formulas if OUT is opened in a spreadsheet. `--escape-formulas`
prefixes the copied cells with a quote (OWASP's advice); the scores are never affected.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from moderation.api.remote import RemoteError
from moderation.core.decision import Classification, ClassifyItem
from moderation.core.errors import InvalidArgument
from moderation.core.policy import ACCEPTABLE_ID, Policy, PolicyError
from moderation.exit_codes import EXIT_ERROR, EXIT_FAILED_ROWS, EXIT_OK, EXIT_USAGE
from moderation.jobs import formats
from moderation.jobs.conversations import parse_messages
from moderation.jobs.csv_input import DecodedLines, Input, InputError, Row, read_csv
from moderation.jobs.options import (
    add_long_text_option,
    add_model_options,
    add_policy_option,
    add_remote_options,
    add_role_option,
    add_threshold_options,
    policy_option,
    threshold_options,
)
from moderation.jobs.progress import DEFAULT_INTERVAL, ProgressReporter
from moderation.jobs.scoring import Scorer, make_scorer

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")

# Fields of several megabytes are real (pasted logs); the csv module's 128 KiB default is not.
csv.field_size_limit(2**31 - 1)


class UsageError(Exception):
    """Bad arguments or input that make the whole job impossible (exit code 2)."""


@dataclass
class Progress:
    """What is committed: input rows written to OUT, OUT's length, and the running counts."""

    rows: int = 0
    output_bytes: int = 0
    failed: int = 0
    flagged: dict[str, int] = field(default_factory=dict)
    complete: bool = False  # the whole input is in OUT: --resume has nothing left to do
    input_bytes: int | None = None  # the input's size when it completed
    # A CSV output of a JSONL input: the input columns its header has (all the keys the input
    # had when the job began), which the rows appended on --resume must keep.
    columns: list[str] | None = None

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.__dict__, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Progress:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise UsageError(f"cannot resume: {path} is unreadable ({exc})") from exc


CONTEXT_COLUMNS = ("context_tokens", "context_messages_dropped")
"""Added after the scores when the rows are conversations."""


def output_columns(
    input_columns: list[str], policy: Policy, *, conversations: bool = False
) -> list[str]:
    added = [
        "category",
        "flagged",
        "paper_category",
        *(f"score_{c}" for c in policy.category_ids),
        f"score_{ACCEPTABLE_ID}",
        *(CONTEXT_COLUMNS if conversations else ()),
        "error",
    ]
    clash = sorted(set(added) & set(input_columns))
    if clash:
        raise UsageError(f"input already has column(s) {', '.join(clash)} that the output adds")
    return [*input_columns, *added]


def result_cells(
    outcome: Classification | str, policy: Policy, *, conversations: bool = False
) -> list[str]:
    ids = [*policy.category_ids, ACCEPTABLE_ID]
    context = len(CONTEXT_COLUMNS) if conversations else 0
    if isinstance(outcome, str):
        return ["", "", "", *([""] * (len(ids) + context)), outcome]
    counts = [str(outcome.context_tokens), str(outcome.context_messages_dropped)]
    return [
        outcome.category,
        "true" if outcome.flagged else "false",
        outcome.paper_category,
        *(f"{outcome.scores.get(i, 0.0):.6f}" for i in ids),
        *(counts if conversations else ()),
        "",
    ]


class CountingReader(io.RawIOBase):
    """Bytes read so far from a binary file: progress without tell() on a text stream."""

    def __init__(self, raw: IO[bytes]):
        self.raw = raw
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(len(buffer))
        buffer[: len(data)] = data
        self.count += len(data)
        return len(data)


@dataclass
class BatchJob:
    input: str
    output: str
    text_column: str | None  # exactly one of text_column and messages_column
    prompt_column: str | None
    role: str
    policy: str | None
    threshold: float | None
    encoding: str
    delimiter: str
    batch_size: int
    resume: bool
    escape_formulas: bool
    category_thresholds: Mapping[str, float] = field(default_factory=dict)
    messages_column: str | None = None
    overwrite: bool = False  # start over even if OUT or its journal exists

    @property
    def columns(self) -> list[str]:
        """The input columns the job reads."""
        named = (self.text_column, self.prompt_column, self.messages_column)
        return [c for c in named if c is not None]

    def items(self, row: dict[str, str | None]) -> ClassifyItem | str:
        if self.messages_column is not None:
            return self._conversation(row, self.messages_column)
        assert self.text_column is not None
        text = row.get(self.text_column)
        if text is None:
            return f"missing column {self.text_column!r} in this row"
        prompt = None
        if self.prompt_column is not None:
            prompt = row.get(self.prompt_column)
            if prompt is None:
                return f"missing column {self.prompt_column!r} in this row"
        return ClassifyItem(
            text,
            role=self.role,
            user_prompt=prompt or None,
            policy=self.policy,
            threshold=self.threshold,
            category_thresholds=self.category_thresholds,
        )

    def _conversation(self, row: dict[str, str | None], column: str) -> ClassifyItem | str:
        cell = row.get(column)
        if cell is None:
            return f"missing column {column!r} in this row"
        try:
            messages = parse_messages(cell)
        except InvalidArgument as exc:
            return str(exc)
        return ClassifyItem(
            messages=messages,
            policy=self.policy,
            threshold=self.threshold,
            category_thresholds=self.category_thresholds,
        )


UNREADABLE: tuple[type[Exception], ...] = (InputError, *formats.READ_ERRORS)
"""What reading a broken input raises: the job stops there (exit 2, naming the line)."""


def _named(row: Row, columns: list[str]) -> dict[str, str | None]:
    if row.values is not None:  # the format named them (JSONL)
        return row.values
    # A short row lacks columns (None); a long one is an error row before it gets here.
    values: list[str | None] = [*row.cells, *([None] * (len(columns) - len(row.cells)))]
    return dict(zip(columns, values, strict=False))


def read_input(job: BatchJob, raw: io.RawIOBase, columns: list[str] | None = None) -> Input:
    """The input's columns and rows, in the format its name says (`formats`); a new format
    plugs in here, as a reader giving an `Input`. A JSONL input's columns are `columns` (a
    resumed job's) or every key of the file."""
    try:
        if formats.format_of(job.input, job.output) == formats.JSONL:
            if columns is None and job.input != "-":  # standard input is read once
                columns = formats.jsonl_columns(job.input, job.encoding)
            # Decoded line by line, as CSV: an invalid byte names its line, not a chunk's.
            lines = DecodedLines(formats.binary_input(raw, job.input), job.encoding)
            reader = formats.JsonlReader(lines, job.input, columns)  # type: ignore[arg-type]
            source = Input(reader.header, formats.jsonl_rows(reader))
        else:
            binary = formats.binary_input(raw, job.input)
            source = read_csv(binary, encoding=job.encoding, delimiter=job.delimiter)
    except UNREADABLE as exc:
        raise UsageError(f"{job.input}: cannot read the header ({exc})") from exc
    missing = [c for c in job.columns if c not in source.columns]
    if missing:
        raise UsageError(
            f"{job.input}: no column {missing[0]!r}; the columns are: {', '.join(source.columns)}"
        )
    return source


def check_output(job: BatchJob) -> None:
    """UsageError when the job would overwrite an earlier one's output or journal: a run
    without --resume used to truncate a finished output (1,680 scored rows became 169 bytes)."""
    if job.output == "-" or job.resume or job.overwrite:
        return
    for path in (Path(job.output), Path(job.output + ".progress")):
        if path.exists():
            raise UsageError(
                f"{path} exists: pass --resume to continue that job, or --overwrite to start over"
            )


def check_input(job: BatchJob) -> None:
    """UsageError unless the input file opens and has the job's columns: checked before the
    model loads (minutes on 7B), not after. Standard input is read once, so not checked here."""
    if job.input == "-":
        return
    try:
        with open(job.input, "rb") as raw:
            read_input(job, CountingReader(raw))
    except FileNotFoundError:
        raise UsageError(f"{job.input}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{job.input}: is a directory, not a file") from None
    except PermissionError:
        raise UsageError(f"{job.input}: cannot read it (permission denied)") from None


def finished(job: BatchJob) -> Progress | None:
    """The earlier outcome when --resume finds a job that already completed, else None."""
    if not job.resume or job.output == "-" or job.input == "-":
        return None
    path = Path(job.output + ".progress")
    if not path.exists():
        return None
    progress = Progress.load(path)
    if not progress.complete or not Path(job.output).exists():
        return None
    # Rows appended to the input since: not finished, --resume scores the new rows.
    size = os.stat(job.input).st_size
    return progress if progress.input_bytes in (None, size) else None


def run(job: BatchJob, scorer: Scorer, *, reporter: ProgressReporter | None = None) -> Progress:
    """Score the whole file; returns the final counts (the earlier ones when --resume finds
    the job complete: nothing is scored again)."""
    to_stdout = job.output == "-"
    if job.resume and (to_stdout or job.input == "-"):
        raise UsageError("--resume needs files for input and output (not stdin or stdout)")
    done = finished(job)
    if done is not None:
        return done
    check_output(job)
    policy = scorer.policy(job.policy)
    progress_path = Path(job.output + ".progress")
    progress = Progress()
    if job.resume and progress_path.exists():
        progress = Progress.load(progress_path)
        progress.complete = False  # complete before, yet the input grew since
    elif not to_stdout:
        progress_path.unlink(missing_ok=True)  # --overwrite: the old journal is void
    # Without a progress file nothing was committed: starting over writes the same file an
    # uninterrupted run writes.

    raw: IO[bytes] = sys.stdin.buffer if job.input == "-" else open(job.input, "rb")  # noqa: SIM115
    total = None if job.input == "-" else os.fstat(raw.fileno()).st_size
    counting = CountingReader(raw)
    jsonl = formats.format_of(job.input, job.output) == formats.JSONL
    jsonl_output = formats.format_of(job.output, job.input) == formats.JSONL
    resumed = bool(progress.rows or progress.output_bytes)
    # A CSV output's header is written once: a resumed job keeps its columns.
    committed = progress.columns if jsonl and not jsonl_output and resumed else None
    try:
        source = read_input(job, counting, committed)
    except BaseException:
        if raw is not sys.stdin.buffer:
            raw.close()
        raise
    header = source.columns
    conversations = job.messages_column is not None
    columns = output_columns(header, policy, conversations=conversations)
    if jsonl and not jsonl_output:
        progress.columns = header

    if to_stdout:
        out: IO[str] = sys.stdout
    elif resumed:
        out = formats.open_output(job.output, "r+")
        out.truncate(progress.output_bytes)  # drop rows written after the last commit
        out.seek(progress.output_bytes)
    else:
        out = formats.open_output(job.output, "w")
    writer: Any
    if jsonl_output:
        writer = formats.JsonlWriter(out, len(header), columns)
    elif jsonl:
        writer = formats.CsvWriter(out, job.delimiter)
    else:
        writer = csv.writer(out, delimiter=job.delimiter, lineterminator="\r\n")

    def commit() -> None:
        out.flush()
        if not to_stdout:
            os.fsync(out.fileno())
            progress.output_bytes = out.tell()
            progress.save(progress_path)

    if progress.rows == 0 and progress.output_bytes == 0:
        writer.writerow(columns)
        commit()
    rows = source.rows
    if jsonl:
        added = columns[len(header) :]
        rows = formats.keys_outside_the_columns(rows, header, added, csv_output=not jsonl_output)
    try:
        for _ in range(progress.rows):  # already committed by an earlier run
            next(rows)
    except StopIteration:
        pass
    except UNREADABLE as exc:
        raise UsageError(f"{job.input}: {exc}") from exc

    if reporter is not None:
        reporter.started(progress.rows, counting.count / total if total else 0.0)
        reporter.start_timer()
    batch: list[tuple[list[str], ClassifyItem | str]] = []

    def flush_batch() -> None:
        items = [b[1] for b in batch if isinstance(b[1], ClassifyItem)]
        scored = iter(scorer.score(items)) if items else iter(())
        for cells, item in batch:
            outcome = next(scored) if isinstance(item, ClassifyItem) else item
            copied = [_escape(c) for c in cells] if job.escape_formulas else cells
            padded = copied + [""] * (len(header) - len(copied))
            writer.writerow([*padded, *result_cells(outcome, policy, conversations=conversations)])
            if isinstance(outcome, str):
                progress.failed += 1
            elif outcome.flagged:
                progress.flagged[outcome.category] = progress.flagged.get(outcome.category, 0) + 1
        progress.rows += len(batch)
        commit()
        batch.clear()
        if reporter is not None:
            reporter.update(progress.rows, counting.count / total if total else None)

    try:
        for row in rows:
            batch.append((row.cells, row.error or job.items(_named(row, header))))
            if len(batch) >= job.batch_size:
                flush_batch()
        if batch:
            flush_batch()
    except UNREADABLE as exc:
        if batch:
            flush_batch()  # the rows before the unreadable line are scored and committed
        where = job.output if not to_stdout else "the output"
        raise UsageError(
            f"{job.input}: {exc}; the {progress.rows} rows before it are in {where}: fix the "
            "file and rerun with --resume"
        ) from None
    finally:
        if reporter is not None:
            reporter.stop_timer()
        if not to_stdout:
            out.close()
        if raw is not sys.stdin.buffer:
            raw.close()
    if not to_stdout:
        progress.complete = True
        progress.input_bytes = total
        progress.save(progress_path)
    if reporter is not None:
        reporter.finish()
    return progress


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the job."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signal = signum


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM (a pod's stop) raise `Interrupted` in the job, so that it can say
    how to resume; the earlier handlers are back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    earlier = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in earlier.items():
            signal.signal(signum, handler)


def resume_hint(job: BatchJob, signum: int) -> str:
    """What to do after an interruption: where the job stands and the command that goes on."""
    name = signal.Signals(signum).name
    if job.output == "-" or job.input == "-":
        return f"interrupted ({name}); stdin or stdout cannot be resumed: run it again"
    path = Path(job.output + ".progress")
    rows = Progress.load(path).rows if path.exists() else 0
    return (
        f"interrupted ({name}) with {rows} rows committed to {job.output}; rerun the same "
        "command with --resume to continue from there"
    )


def _escape(cell: Any) -> Any:
    return "'" + cell if isinstance(cell, str) and cell.startswith(FORMULA_START) else cell


def max_failed_rows(value: str) -> tuple[int, float]:
    """--max-failed-rows: a count (`10`) or a percentage of the rows (`0.5%`)."""
    try:
        if value.endswith("%"):
            percent = float(value[:-1])
            if not 0.0 <= percent <= 100.0:
                raise ValueError
            return 0, percent
        count = int(value)
        if count < 0:
            raise ValueError
        return count, 0.0
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a count of rows (10) or a percentage (1%), got {value!r}"
        ) from None


def too_many_failed(progress: Progress, limit: tuple[int, float]) -> bool:
    count, percent = limit
    allowed = max(count, int(progress.rows * percent / 100.0))
    return progress.failed > allowed


def summary(progress: Progress) -> str:
    scored = progress.rows - progress.failed
    flagged = sum(progress.flagged.values())
    by_cat = ", ".join(f"{k} {v}" for k, v in sorted(progress.flagged.items())) or "none"
    return (
        f"{progress.rows} rows: {scored} scored, {progress.failed} failed, "
        f"{flagged} flagged ({by_cat})"
    )


def check_columns(ns: argparse.Namespace) -> None:
    """Exactly one of --text-column and --messages-column; a conversation says its own roles
    and context, so --role and --prompt-column do not go with it."""
    if (ns.text_column is None) == (ns.messages_column is None):
        raise UsageError("give one of --text-column and --messages-column")
    if ns.messages_column is not None:
        for given, option in ((ns.prompt_column, "--prompt-column"), (ns.role, "--role")):
            if given is not None:
                raise UsageError(
                    f"{option} does not go with --messages-column: each conversation's last "
                    "message is classified by its role, after the earlier ones"
                )


def _run(ns: argparse.Namespace) -> int:
    try:
        check_columns(ns)
        policy, policy_files = policy_option(ns.policy, remote=bool(ns.target))
        policy, thresholds = threshold_options(ns, policy)
        job = BatchJob(
            input=ns.input,
            output=ns.output,
            text_column=ns.text_column,
            prompt_column=ns.prompt_column,
            messages_column=ns.messages_column,
            role=ns.role or "input",
            policy=policy,
            encoding=ns.encoding,
            delimiter=ns.delimiter,
            batch_size=ns.batch_size,
            resume=ns.resume,
            overwrite=ns.overwrite,
            escape_formulas=ns.escape_formulas,
            **thresholds,
        )
        if ns.resume and ns.overwrite:
            raise UsageError("--resume continues a job, --overwrite starts it over: give one")
        earlier = finished(job)
        if earlier is not None:
            print(f"{job.output}: already complete (--resume has nothing to do)", file=sys.stderr)
            progress = earlier
        else:
            check_input(job)  # all of it before the model loads
            check_output(job)
            scorer = make_scorer(ns, policy_files)
            reporter = ProgressReporter(sys.stderr, name="batch", interval=ns.progress_interval)
            try:
                with terminate_as_interrupt():
                    progress = run(job, scorer, reporter=reporter)
            except Interrupted as exc:
                print(f"moderation batch: {resume_hint(job, exc.signal)}", file=sys.stderr)
                return 128 + exc.signal
            finally:
                scorer.close()
    except (UsageError, InvalidArgument, PolicyError, OSError, LookupError) as exc:
        print(f"moderation batch: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RemoteError as exc:
        print(f"moderation batch: error: {exc}; rerun with --resume to continue", file=sys.stderr)
        return EXIT_ERROR
    print(summary(progress), file=sys.stderr)
    if too_many_failed(progress, ns.max_failed_rows):
        print(
            f"moderation batch: {progress.failed} rows failed (more than --max-failed-rows "
            "allows; their `error` column says why); rerunning scores the same rows",
            file=sys.stderr,
        )
        return EXIT_FAILED_ROWS
    return EXIT_OK


def register(sub: Any) -> None:
    """Add the `batch` subcommand."""
    p = sub.add_parser("batch", help="score a CSV or JSONL file (resumable)")
    p.add_argument(
        "input",
        help="input file, or - for stdin: CSV, or JSONL when named .jsonl/.ndjson; .gz: gzip",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="output file, or - for stdout (its format by its name as for the input; - takes "
        "the input's)",
    )
    p.add_argument("--text-column", help="column with the text to classify")
    p.add_argument("--prompt-column", help="output role: column with the user prompt")
    p.add_argument(
        "--messages-column",
        metavar="NAME",
        help="instead of --text-column: column whose cells are conversations, JSON lists of "
        '{"role", "content"}; the last message of each is classified after the earlier ones',
    )
    add_role_option(p)
    p.set_defaults(role=None)  # input, unless given; and not given with --messages-column
    add_policy_option(p, None, remote=True)
    add_threshold_options(p)
    add_long_text_option(p, "reject")
    add_model_options(p)
    add_remote_options(p)
    p.add_argument("--batch-size", type=int, default=64, help="rows per engine pass / commit")
    p.add_argument(
        "--encoding", default="utf-8-sig", help="input encoding (default: UTF-8, BOM allowed)"
    )
    p.add_argument("--delimiter", default=",", help="field delimiter (default ,)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted job; a finished one only reports its outcome again",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over when OUT (or its journal) exists; without it or --resume, exit 2",
    )
    p.add_argument(
        "--max-failed-rows",
        type=max_failed_rows,
        default=(0, 0.0),
        metavar="N|P%",
        help="rows that may fail (empty text, too long...) with exit code 0: a count or a "
        f"percentage; more exit with {EXIT_FAILED_ROWS} (default 0)",
    )
    p.add_argument(
        "--progress-interval",
        type=float,
        default=DEFAULT_INTERVAL,
        metavar="SECONDS",
        help="off a terminal, a progress line every SECONDS (0: none; default "
        f"{DEFAULT_INTERVAL:g}); a terminal gets a bar",
    )
    p.add_argument(
        "--escape-formulas", action="store_true", help="quote copied cells that look like formulas"
    )
    p.set_defaults(func=_run)
