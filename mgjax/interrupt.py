"""Ctrl-C and SIGTERM for the `mgjax` command: raised in the main thread (so outputs are cleaned up) and
remembered, because an exception raised while Python runs a finalizer (JAX's garbage-collection callback,
say) is dropped. `check()` at a commit point re-raises a signal that was dropped that way; Python's report
of the dropped one is silenced, so the command still ends with its one line."""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from typing import Iterator


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt."""


_received: list[type[BaseException]] = []


def _raiser(exc: type[BaseException]):
    def handler(signum, frame):
        _received.append(exc)
        raise exc

    return handler


def _quiet(previous):
    """An unraisable hook that drops the reports of our remembered signals and passes on the rest."""
    def hook(info):
        if not (isinstance(info.exc_value, (KeyboardInterrupt, Terminated)) and _received):
            previous(info)

    return hook


@contextmanager
def handled() -> Iterator[None]:
    """SIGINT -> KeyboardInterrupt and SIGTERM -> Terminated, both remembered, for the duration."""
    previous = {s: signal.signal(s, _raiser(e)) for s, e in ((signal.SIGINT, KeyboardInterrupt),
                                                             (signal.SIGTERM, Terminated))}
    previous_hook, sys.unraisablehook = sys.unraisablehook, _quiet(sys.unraisablehook)
    _received.clear()
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        sys.unraisablehook = previous_hook
        _received.clear()


def check() -> None:
    """Raises the signal received under `handled()`, if any: call it before making work final."""
    if _received:
        raise _received[-1]
