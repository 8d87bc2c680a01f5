"""Progress for long runs: a tqdm bar on a terminal, a log line every so often otherwise
(CI logs and ``nohup`` files stay readable instead of filling with carriage returns)."""

from __future__ import annotations

import sys
import time
from typing import Optional


def format_duration(seconds: float) -> str:
    seconds = int(round(max(0.0, seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Progress:
    """``mode``: "auto" (bar when stderr is a terminal, else lines), "bar", "lines" or "off".

    ``initial`` counts work done by earlier runs: it shows in the position but not in the rate.
    """

    def __init__(self, total: int, desc: str, *, unit: str = "img", mode: str = "auto",
                 initial: int = 0, every_s: float = 30.0, stream=None):
        if mode not in ("auto", "bar", "lines", "off"):
            raise ValueError(f"progress mode must be auto, bar, lines or off, got {mode!r}")
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.mode, self.total, self.desc, self.unit = mode, total, desc, unit
        self.done = initial
        self._initial = initial
        self._start = time.perf_counter()
        self._last_line = self._start
        self.every_s = every_s
        self._extra: dict = {}
        self._bar = None
        self._closed = False
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream,
                             dynamic_ncols=True, smoothing=0.1)

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self._start
        return (self.done - self._initial) / elapsed if elapsed > 0 else 0.0

    def set_total(self, total: int) -> None:
        """The total, once it is known (a count that needed a first look at the input)."""
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def update(self, count: int = 1, **extra) -> None:
        self.done += count
        self._extra.update(extra)
        if self._bar is not None:
            self._bar.update(count)
            if extra:
                self._bar.set_postfix(self._extra, refresh=False)
        elif self.mode == "lines":
            now = time.perf_counter()
            if now - self._last_line >= self.every_s:
                self._last_line = now
                self._print_line()

    def _print_line(self, final: bool = False) -> None:
        rate = self.rate
        parts = [f"{self.desc}: {self.done}/{self.total} {self.unit}"]
        if self.total:
            parts[0] += f" ({100.0 * self.done / self.total:.0f}%)"
        parts.append(f"{rate:.1f} {self.unit}/s")
        if not final and rate > 0 and self.total:
            parts.append(f"ETA {format_duration((self.total - self.done) / rate)}")
        parts += [f"{k} {v}" for k, v in self._extra.items()]
        print(", ".join(parts), file=self.stream, flush=True)

    def close(self, message: Optional[str] = None) -> None:
        """Finish the display; closing again does nothing."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "lines":
            self._print_line(final=True)
        if message and self.mode != "off":
            print(message, file=self.stream, flush=True)
