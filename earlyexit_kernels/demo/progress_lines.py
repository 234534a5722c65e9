"""Progress as whole lines, for output that is not a terminal (a file, a pipe, a CI log).

A progress bar redraws one line with carriage returns, so the demo shows its bars only on a
terminal; piped to a file it would otherwise say nothing for as long as it runs. Here:

- :class:`StageLines`: one line as each stage starts (what it does, and how long it took on a
  measured machine) and one as it ends (how long it took here);
- :class:`RateLines`: tqdm's ``update`` / ``set_postfix`` / ``close``, as a line after the first
  steps (their rate measured here, and the time left at that rate) and then one a minute.
"""

from __future__ import annotations

import sys
import time

__all__ = ["RateLines", "StageLines", "duration"]


def duration(seconds: float) -> str:
    """``"12 s"``, ``"4 min"``, ``"1 h 05 min"``: a duration as a person reads it."""
    if seconds < 90:
        return f"{max(round(seconds), 1)} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


class StageLines:
    """``stage K/N: WHAT (ESTIMATE)`` as stage K starts, ``stage K/N done in T`` as it ends.

    Written to ``stream`` (default: stderr at the time of each line) and flushed, so that a
    reader of a log file sees each line as it is written.
    """

    def __init__(self, total: int, stream=None, clock=time.perf_counter):
        self.total, self.stream, self.clock = total, stream, clock
        self.number, self.started = 0, None

    def start(self, what: str, estimate: str | None = None) -> None:
        self.end()
        self.number += 1
        self.started = self.clock()
        self._line(f"stage {self.number}/{self.total}: {what}" + (f" ({estimate})" if estimate else ""))

    def end(self) -> None:
        if self.started is not None:
            self._line(f"stage {self.number}/{self.total} done in {duration(self.clock() - self.started)}")
            self.started = None

    def _line(self, text: str) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        print(text, file=stream, flush=True)


class RateLines:
    """What the loops here call on a tqdm bar (``update``, ``set_postfix``, ``close``), as lines.

    The first line comes after ``first`` steps (the rate of those steps, and the time left at
    it), then one every ``every_s`` seconds, and one at ``close``; each names the steps done,
    the seconds so far and the last postfix (a loss).
    """

    def __init__(
        self,
        total: int,
        description: str,
        unit: str = "step",
        stream=None,
        *,
        first: int = 8,
        every_s: float = 60.0,
        clock=time.perf_counter,
    ):
        self.total, self.description, self.unit, self.stream = total, description, unit, stream
        self.first, self.every_s, self.clock = first, every_s, clock
        self.done, self.postfix = 0, ""
        self.started = clock()
        self.last_line: float | None = None

    def set_postfix(self, refresh: bool = False, **values) -> None:
        self.postfix = ", ".join(f"{name} {value}" for name, value in values.items())

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        due = self.done >= self.first if self.last_line is None else now - self.last_line >= self.every_s
        if due and self.done < self.total:
            self._line(now, left=True)

    def close(self) -> None:
        self._line(self.clock(), left=False)

    def _line(self, now: float, *, left: bool) -> None:
        self.last_line = now
        spent = now - self.started
        text = f"{self.description}: {self.done:,} of {self.total:,} {self.unit}s in {duration(spent)}"
        if left and self.done:
            per = spent / self.done
            text += f" ({per:.2f} s/{self.unit}): about {duration(per * (self.total - self.done))} left at this rate"
        if self.postfix:
            text += f"; {self.postfix}"
        stream = self.stream if self.stream is not None else sys.stderr
        print(text, file=stream, flush=True)
