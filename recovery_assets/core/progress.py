"""Time-based progress lines for long work (fits, regenerated data), pure Python.

A :class:`Progress` counts finished units of work (fits, simulations) and steps (optimiser
iterations) and, at most once every ``every_s`` seconds, sends one line to its ``log`` callback
(in a Dagster step ``context.log.info``): done / total, the rate of steps, the time elapsed and
an estimate of the time left::

    fitting full/shrinkage: 3/12 fits done, 2.41 iterations/s, 1m 12s elapsed, ETA 4m 50s

The estimate extrapolates the work done so far: finished units count whole, running ones with
the part of them that is done (``running``; e.g. iterations / max_iter, a lower bound, so the
ETA errs on the long side until units finish). The units a running piece has already finished
(the fits of a batch that stopped while the rest go on) count as done in the line. It is
thread-safe: concurrent fitting batches report into one object.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager

__all__ = ["Progress", "format_seconds"]


def format_seconds(seconds: float) -> str:
    """``42s``, ``3m 07s``, ``2h 05m``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


class Progress:
    """Reports ``done/total`` units, the step rate and the ETA every ``every_s`` seconds.

    Parameters
    ----------
    total : units of work in all (fits, simulations).
    log : where the lines go (None: nothing is logged, the counts are still kept).
    every_s : least time between two lines; 0 reports on every update.
    label : start of every line (``fitting full/shrinkage``).
    unit, step_unit : names of the units and of the steps (``fits``, ``iterations``).
    clock : monotonic time in seconds (tests pass a fake one).
    """

    def __init__(
        self,
        total: int,
        log: Callable[[str], None] | None,
        every_s: float = 30.0,
        *,
        label: str = "progress",
        unit: str = "fits",
        step_unit: str = "iterations",
        clock: Callable[[], float] = time.monotonic,
    ):
        if every_s < 0:
            raise ValueError(f"every_s must be >= 0, got {every_s}")
        self.total = int(total)
        self.log = log
        self.every_s = float(every_s)
        self.label, self.unit, self.step_unit = label, unit, step_unit
        self._clock = clock
        self.started = clock()
        self._last = self.started
        self.done = 0
        self.steps = 0
        self.lines = 0  # lines sent to log
        self._partial: dict[Hashable, float] = {}
        self._finished: dict[Hashable, int] = {}  # units of running pieces that have finished
        self._lock = threading.Lock()

    def advance(self, done: int = 0, steps: int = 0, *, running: Hashable | None = None) -> None:
        """Add finished units and steps; ``running`` names a running piece that has finished
        (its partial credit is dropped as its units are counted in ``done``)."""
        with self._lock:
            self.done += int(done)
            self.steps += int(steps)
            if running is not None:
                self._partial.pop(running, None)
                self._finished.pop(running, None)
            self._maybe_report()

    def running(self, key: Hashable, units: float, steps: int = 0, finished: int = 0) -> None:
        """Set the part of the units that the running piece ``key`` has done (e.g. a batch of 4
        fits at iteration 100 of at most 1000: 0.4), how many of its units have already
        finished (``finished``: fits of a batch that have stopped while others go on; counted
        as done in the lines), and add ``steps``."""
        with self._lock:
            self._partial[key] = float(units)
            self._finished[key] = int(finished)
            self.steps += int(steps)
            self._maybe_report()

    @contextmanager
    def ticking(self, period_s: float | None = None) -> Iterator[Progress]:
        """While the block runs, a background thread checks every ``period_s`` seconds (default:
        ``every_s`` within 0.1-1 s) whether a line is due: for work with no finer hook of its own (a
        long call that cannot report), so a line still comes at least every ``every_s``."""
        period = min(max(self.every_s, 0.1), 1.0) if period_s is None else float(period_s)
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(max(period, 0.01)):
                with self._lock:
                    self._maybe_report()

        thread = threading.Thread(target=beat, name="progress", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()

    def report(self) -> str:
        """Send a line now (whatever the interval) and return it."""
        with self._lock:
            return self._emit(self._clock())

    def message(self, now: float | None = None) -> str:
        now = self._clock() if now is None else now
        elapsed = max(now - self.started, 0.0)
        work = min(self.done + sum(self._partial.values()), float(self.total))
        rate = self.steps / elapsed if elapsed > 0 else 0.0
        done = min(self.done + sum(self._finished.values()), self.total)
        if self.done >= self.total:
            eta = "0s"
        elif work > 0 and elapsed > 0:
            eta = format_seconds(elapsed * (self.total - work) / work)
        else:
            eta = "unknown"
        return (
            f"{self.label}: {done}/{self.total} {self.unit} done, {rate:.3g} "
            f"{self.step_unit}/s, {format_seconds(elapsed)} elapsed, ETA {eta}"
        )

    def _maybe_report(self) -> None:
        now = self._clock()
        if now - self._last >= self.every_s:
            self._emit(now)

    def _emit(self, now: float) -> str:
        line = self.message(now)
        self._last = now
        if self.log is not None:
            self.lines += 1
            self.log(line)
        return line
