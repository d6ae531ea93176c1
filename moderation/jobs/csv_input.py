"""The rows of a batch input file in CSV, read strictly: every byte accounted for.

What the csv module does by default, and what is done here instead:

- an unterminated quote runs to the end of the file, silently merging every row after it into
  one cell: read with `strict=True`, it is an `InputError` naming the line where its row began;
- a row with more cells than the header shifts the result columns: here it is that row's error
  (`Row.error`), its first cells copied under the header's columns;
- text is decoded in 8 KiB chunks, so an invalid byte in row 101 fails the read of the header
  and rows 1-100 are never scored: here each line is decoded as it is read, so the error names
  its line and comes after the rows before it (the job scores those, then stops).

A second input format plugs in the same way (JSONL does, in `moderation.jobs.batch.read_input`):
a function that returns an `Input` (the columns, then `Row`s with their line numbers), raising
`InputError` for what makes the rest of the file unreadable and setting `Row.error` for what
spoils only one row.
"""

from __future__ import annotations

import codecs
import csv
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

# Fields of several megabytes are real (pasted logs); the csv module's 128 KiB default is not.
csv.field_size_limit(2**31 - 1)


class InputError(Exception):
    """The input cannot be read past `line` (1-based, physical lines of the file)."""

    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


@dataclass(frozen=True)
class Row:
    """One data row: the line it starts on, its cells, why it cannot be scored (if so), and
    its values by column when the format names them itself (JSONL) rather than by position."""

    line: int
    cells: list[Any]
    error: str | None = None
    values: dict[str, str | None] | None = None


@dataclass
class Input:
    """An input file opened for a job: its column names, then its rows in order."""

    columns: list[str]
    rows: Iterator[Row]


class DecodedLines:
    """The file's lines, each decoded on its own (an invalid byte is an InputError naming its
    line, after the lines before it were read); `number` is the last line read. JSONL reads
    its lines through it too."""

    def __init__(self, raw: IO[bytes], encoding: str):
        self.raw = raw
        self.encoding = codecs.lookup(encoding).name
        self.decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
        self.number = 0

    def __iter__(self) -> Iterator[str]:
        for data in self.raw:
            self.number += 1
            try:
                yield self.decoder.decode(data)
            except UnicodeDecodeError as exc:
                raise InputError(
                    self.number,
                    f"not valid {self.encoding} (byte {exc.object[exc.start]:#04x} at "
                    f"column {exc.start + 1})",
                ) from None


def read_csv(raw: IO[bytes], *, encoding: str, delimiter: str) -> Input:
    """The header, then the rows of a CSV file. InputError for an empty file, an unreadable
    header, and, as the rows are read, for an invalid byte or an unterminated quote."""
    lines = DecodedLines(raw, encoding)
    reader = csv.reader(lines, delimiter=delimiter, strict=True)

    def record() -> list[str] | None:
        start = lines.number + 1
        try:
            return next(reader)
        except StopIteration:
            return None
        except csv.Error as exc:
            reason = str(exc)
            if "unexpected end of data" in reason:
                reason = "a quoted cell is never closed (its quote runs to the end of the file)"
            raise InputError(start, reason) from None

    header = record()
    if header is None:
        raise InputError(1, "empty file, no header row")

    def rows() -> Iterator[Row]:
        while True:
            start = lines.number + 1
            cells = record()
            if cells is None:
                return
            if len(cells) > len(header):
                error = (
                    f"line {start}: {len(cells)} cells, the header has {len(header)} (an "
                    "unquoted delimiter?); only the first ones are copied"
                )
                yield Row(start, cells[: len(header)], error)
            else:
                yield Row(start, cells)

    return Input(header, rows())
