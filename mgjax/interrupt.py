"""Ctrl-C and SIGTERM for the `mgjax` command: raised in the main thread (so outputs are cleaned up), never
inside an import (it is sent again once the import is over), and remembered, because an exception raised
while Python runs a finalizer (JAX's garbage-collection callback, say) is dropped. `check()` at a commit
point re-raises a signal that was dropped that way; Python's report of the dropped one is silenced, so the
command still ends with its one line."""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt."""


_received: list[type[BaseException]] = []


def _importing(frame) -> bool:
    """Whether `frame` runs inside an import (a module body, or a C extension initialising)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _raiser(exc: type[BaseException]):
    def handler(signum, frame):
        if _importing(frame):
            # An exception raised inside an import leaves the module half initialised: jaxlib's extension then
            # fails with an ImportError, or the process crashes. The signal comes back once the import is over.
            threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
            return
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


def command_name(argv: list[str]) -> str:
    """The `mgjax` command's subcommand in `argv`, before the parser has read it."""
    return next((a for a in argv if not a.startswith("-")), "")


def stopped(e: BaseException, name: str, exit_now: bool) -> int:
    """The one line of a command a signal stopped, and its exit status (130 Ctrl-C, 143 SIGTERM). With
    `exit_now` the process ends there and then: the work it stopped may hold half-built objects (an asyncio
    loop inside Orbax, say) whose finalizers would print tracebacks as the exception is dropped; the outputs
    are already clean."""
    what, code = ("interrupted", 130) if isinstance(e, KeyboardInterrupt) else ("terminated", 143)
    print(f"mgjax {name}: {what}; nothing half-written was left", file=sys.stderr)
    if exit_now:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
