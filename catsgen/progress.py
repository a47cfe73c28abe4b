"""A progress bar on stderr: on a terminal one line redrawn in place; in logs a line every 10%."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total: int, unit: str = "tokens", stream=None):
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = self.last_draw = time.perf_counter()
        self.done, self.last_tenth = 0, 0

    def update(self, done: int):
        self.done = done
        now = time.perf_counter()
        if self.tty and now - self.last_draw >= 0.1:
            self.last_draw = now
            self.stream.write("\r" + self._line(now))
            self.stream.flush()
        elif not self.tty and done * 10 // max(self.total, 1) > self.last_tenth:
            self.last_tenth = done * 10 // max(self.total, 1)
            print(self._line(now), file=self.stream, flush=True)

    def close(self):
        if self.tty or self.last_tenth < 10:  # in logs the 100% line may already be out
            line = self._line(time.perf_counter())
            print(("\r" + line) if self.tty else line, file=self.stream, flush=True)

    def _line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        fraction = min(self.done / max(self.total, 1), 1.0)
        bar = "#" * int(30 * fraction) + "." * (30 - int(30 * fraction))
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 and self.done < self.total else 0.0
        return (f"{self.label} [{bar}] {self.done}/{self.total} {self.unit} "
                f"{rate:.0f} {self.unit}/s, {elapsed:.0f} s elapsed, eta {eta:.0f} s")
