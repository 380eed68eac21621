"""Progress while a run goes: a bar on a terminal, a plain log line every half minute anywhere else.

Why two kinds: a bar redraws one line with carriage returns, which is unreadable in a cron mail, a
``docker logs`` or a CI log; and a log line printed while the bar is on screen lands in the middle of it and
tears it. So:

* stderr is a terminal: a tqdm bar, and for as long as it is shown the console log handlers write through
  ``tqdm.write`` (clear the bar, print the line, redraw the bar): warnings get lines of their own.
* otherwise: no bar, but an INFO line every ``interval`` seconds (30 by default) from a small timer
  thread, so the per-run log shows a long run moving, or stalled (a timer, not the rows, decides when a
  line is due), and one last line when the run ends.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from pipeline.ops.logs import console_handlers
from pipeline.run.summary import Progress

if TYPE_CHECKING:
    from tqdm import tqdm

log = logging.getLogger("pipeline.progress")

#: Seconds between progress lines in the log when no bar is drawn.
PROGRESS_INTERVAL_S = 30.0


class ProgressReporter(Protocol):
    def update(self, progress: Progress) -> None: ...

    def close(self) -> None: ...


def progress_reporter(stream: TextIO, interval: float = PROGRESS_INTERVAL_S) -> ProgressReporter:
    """A bar when ``stream`` (stderr) is a terminal, else progress lines in the log every ``interval`` s."""
    if stream.isatty():
        return ProgressBar(stream)
    return ProgressLog(interval)


class _ThroughTqdm:
    """A stream for a log handler that writes around the bars: tqdm clears them, writes, redraws."""

    def __init__(self, target: TextIO) -> None:
        self.target = target

    def write(self, text: str) -> None:
        from tqdm import tqdm

        tqdm.write(text, file=self.target, end="")

    def flush(self) -> None:
        self.target.flush()


class ProgressBar:
    """tqdm fed from the engine's progress callback, redrawn at most every 0.2 s (a row costs well under
    that); the console log handlers on the same stream write through tqdm while it is shown."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.bar: tqdm | None = None
        self._next_draw = 0.0
        self._redirected: list[tuple[logging.StreamHandler[Any], Any]] = []

    def update(self, progress: Progress) -> None:
        now = time.monotonic()
        if self.bar is not None and now < self._next_draw and progress.done < progress.total:
            return
        self._next_draw = now + 0.2
        if self.bar is None:
            self.bar = self._open(progress.total)
        if self.bar.total != progress.total:
            self.bar.total = progress.total
        self.bar.n = progress.done
        self.bar.set_postfix(ok=progress.ok, failed=progress.failed, in_flight=progress.in_flight,
                             refresh=False)
        self.bar.update(0)

    def _open(self, total: int) -> tqdm:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", dynamic_ncols=True, mininterval=0.25, file=self.stream)
        for handler in console_handlers():
            if handler.stream is self.stream:
                self._redirected.append((handler, handler.setStream(_ThroughTqdm(self.stream))))
        return bar

    def close(self) -> None:
        for handler, stream in self._redirected:
            handler.setStream(stream)
        self._redirected.clear()
        if self.bar is not None:
            self.bar.close()


class ProgressLog:
    """One INFO line every ``interval`` seconds while the run goes, and one at its end."""

    def __init__(self, interval: float = PROGRESS_INTERVAL_S) -> None:
        self.interval = interval
        self._progress: Progress | None = None
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def update(self, progress: Progress) -> None:
        self._progress = progress  # the engine's live counters, read when a line is due
        if self._thread is None:
            self._started = time.monotonic()
            self._thread = threading.Thread(target=self._tick, name="pipeline-progress", daemon=True)
            self._thread.start()

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            self.log_line()

    def log_line(self, final: bool = False) -> None:
        progress = self._progress
        if progress is None:
            return
        elapsed = time.monotonic() - self._started
        rate = f"{progress.done / elapsed:.2f}" if elapsed > 0 else "-"
        log.info("progress%s: %d of %d rows done (%d ok, %d failed), %d in flight, %d skipped as already done; "
                 "%.0fs, %s rows/s", " (end)" if final else "", progress.done, progress.total, progress.ok,
                 progress.failed, progress.in_flight, progress.skipped, elapsed, rate,
                 extra={"event": "progress", "done": progress.done, "total": progress.total})

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.log_line(final=True)
