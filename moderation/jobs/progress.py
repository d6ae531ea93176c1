"""Progress of a long job on stderr: a bar on a terminal, a line every few seconds elsewhere.

A Job's logs, CI and `nohup` have no terminal; a carriage-return bar there is one endless line
that appears at the end. Off a terminal the reporter writes a plain line (rows, rate, ETA)
every `interval` seconds instead, so `kubectl logs` shows that the job is alive and how far.

The lines come from a timer thread (`start_timer`), not from the job's commits: a chunk that
takes minutes still gets a line every `interval` seconds (the rows committed so far, the rate,
the ETA). The rate and the ETA count this run's work only, so a resumed job's ETA does not
take the rows an earlier run did for work done in this run's time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import IO

DEFAULT_INTERVAL = 10.0
BAR_WIDTH = 30
REDRAW = 0.2  # seconds between redraws of the terminal bar
MIN_TIMER_INTERVAL = 0.05  # a shorter interval would only spin the timer thread


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class ProgressReporter:
    """Reports `done` units (rows, texts) out of an optional total on a stream."""

    def __init__(
        self,
        stream: IO[str] | None,
        *,
        name: str,
        unit: str = "rows",
        interval: float = DEFAULT_INTERVAL,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.stream = stream if interval > 0 else None  # 0 turns progress off
        self.name = name
        self.unit = unit
        self.interval = interval
        self.tty = bool(stream is not None and stream.isatty()) if tty is None else tty
        self.clock = clock
        self.start = clock()
        self.last = self.start
        self.drawn = False
        self.done_at_start: int | None = None
        self.fraction_at_start = 0.0
        self.latest: tuple[int, float | None] | None = None  # what update() last reported
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        self._timed = False  # a timer wrote the lines: finish() writes the last one

    def line(self, done: int, fraction: float | None) -> str:
        """`1,200 rows (40%), 35.2 rows/s, ETA 1m05s`: the rate counts this run's units only."""
        if self.done_at_start is None:
            self.done_at_start = done
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = (done - self.done_at_start) / elapsed
        text = f"{done:,} {self.unit}"
        if fraction is not None:
            text += f" ({100 * min(fraction, 1.0):.0f}%)"
        text += f", {rate:.1f} {self.unit}/s"
        progressed = (fraction or 0.0) - self.fraction_at_start  # this run's share of the whole
        if fraction is not None and 0 < fraction < 1 and rate > 0 and progressed > 0:
            text += f", ETA {_duration(elapsed * (1 - fraction) / progressed)}"
        return text

    def started(self, done: int, fraction: float = 0.0) -> None:
        """Where this run starts (rows already done by an earlier run, and the fraction of the
        input they are, are not in its rate and ETA)."""
        self.done_at_start = done
        self.fraction_at_start = fraction
        self.latest = (done, fraction)

    def start_timer(self) -> None:
        """A line every `interval` seconds off a terminal, whatever the job's commits do."""
        if self.stream is None or self.tty or self._timer is not None:
            return
        self.interval = max(self.interval, MIN_TIMER_INTERVAL)
        self._timed = True
        self._timer = threading.Thread(target=self._tick_loop, name="progress", daemon=True)
        self._timer.start()

    def _tick_loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.tick()

    def tick(self) -> None:
        """The periodic line, with the latest update (or the start) if nothing came since."""
        if self.stream is None or self.latest is None:
            return
        with self._lock:
            done, fraction = self.latest
            self.stream.write(f"{self.name}: {self.line(done, fraction)}\n")
            self.last = self.clock()
            self.stream.flush()

    def update(self, done: int, fraction: float | None = None) -> None:
        self.latest = (done, fraction)
        if self.stream is None:
            return
        if self._timer is not None:
            return  # the timer writes the lines
        now = self.clock()
        if self.done_at_start is None:
            self.done_at_start = done
        if self.tty:
            if now - self.last < REDRAW and self.drawn:
                return
            bar = ""
            if fraction is not None:
                filled = int(BAR_WIDTH * min(fraction, 1.0))
                bar = "[" + "#" * filled + "." * (BAR_WIDTH - filled) + "] "
            self.stream.write(f"\r{bar}{self.line(done, fraction)}   ")
            self.drawn = True
        else:
            if now - self.last < self.interval:
                return
            self.stream.write(f"{self.name}: {self.line(done, fraction)}\n")
        self.last = now
        self.stream.flush()

    def finish(self) -> None:
        """Stops the timer; ends the terminal bar's line, so that what follows starts on a line
        of its own."""
        self.stop_timer()
        if self._timed:
            self._timed = False
            self.tick()  # where the job ended
        if self.stream is not None and self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()

    def stop_timer(self) -> None:
        """No more periodic lines (the job ended or was interrupted)."""
        self._stop.set()
        if self._timer is not None:
            self._timer.join()
