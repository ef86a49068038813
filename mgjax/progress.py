"""A one-line progress bar on stderr: items and bytes done, rate, ETA. Drawn only on a terminal, so
logs stay clean."""

from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """`update(items, nbytes)` after each piece of work; `close()` at the end (also as a context manager)."""

    def __init__(self, what: str, total_items: int, total_bytes: int = 0, unit: str = "tensors", file=None,
                 enabled: bool | None = None, done: int = 0):
        """`total_bytes` 0: the rate and ETA count items. `done`: items finished before (a resumed run)."""
        self.what, self.unit, self.total_items, self.total_bytes = what, unit, total_items, total_bytes
        self.file = file or sys.stderr
        self.enabled = self.file.isatty() if enabled is None else enabled
        self.items, self.bytes, self._done = done, 0, done
        self.start = self._drawn = time.monotonic()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        head = f"{self.what}: {self.items}/{self.total_items} {self.unit}"
        if self.total_bytes:
            rate = self.bytes / elapsed
            eta = (self.total_bytes - self.bytes) / rate if rate > 0 else 0.0
            head += f", {self.bytes / 1e9:.2f}/{self.total_bytes / 1e9:.2f} GB, {rate / 1e6:.0f} MB/s"
        else:
            rate = (self.items - self._done) / elapsed
            eta = (self.total_items - self.items) / rate if rate > 0 else 0.0
            head += f", {rate:.2f} {self.unit}/s"
        return f"{head}, {_duration(elapsed)} elapsed, ETA {_duration(eta)}"

    def update(self, items: int = 1, nbytes: int = 0) -> None:
        self.items += items
        self.bytes += nbytes
        now = time.monotonic()
        if self.enabled and (now - self._drawn >= 0.1 or self.items == self.total_items):
            self._drawn = now
            print(f"\r{self.line()}\033[K", end="", file=self.file, flush=True)

    def close(self) -> None:
        if self.enabled:
            print(file=self.file, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
