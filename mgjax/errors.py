"""The exception types mgjax raises: bad input (files, keys, shapes, configs), and a disk that filled up."""

from __future__ import annotations

import errno
import math
import os
from contextlib import contextmanager
from typing import Callable, Iterator


class MGJaxError(ValueError):
    """Bad user input: the message names the file, key or field and says what to do."""

    exit_code = 2  # what the `mgjax` command exits with


# What a write reports when the space runs out: a full disk, or a user's quota used up.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(MGJaxError):
    """A file that could not be written for want of space: not bad input, so another exit status, but
    the same one line, naming the path, the space needed, and what is left as it was."""

    exit_code = 1

    def __init__(self, path, code: int, nbytes: int, then: str):
        mb = math.ceil(nbytes / 2**20 * 10) / 10  # rounded up: "about 0.0 MB" would not say enough
        super().__init__(f"{path}: {os.strerror(code)} (needs about {mb:.1f} MB free); {then}")


def no_space(e: BaseException) -> int | None:
    """ENOSPC or EDQUOT when `e`, or an exception it was raised from, is a write that ran out of space, else
    None. Python's writes raise OSError with the errno; the C++ writers put it into the message: tensorstore
    (Orbax's arrays) as `[os_error_code='28']`, riegeli (ArrayRecord) as the errno's strerror text."""
    for cause in causes(e):
        for code in NO_SPACE:
            if isinstance(cause, OSError) and cause.errno == code:
                return code
            if not isinstance(cause, OSError) and (f"os_error_code='{code}'" in str(cause)
                                                   or os.strerror(code) in str(cause)):
                return code
    return None


def causes(e: BaseException | None) -> Iterator[BaseException]:
    """`e` and the exceptions it was raised from, outermost first, as a traceback shows them."""
    while e is not None:
        yield e
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)


@contextmanager
def stop_when_full(path, nbytes: Callable[[], int], then: str) -> Iterator[None]:
    """Turns a write that runs out of space in the body into `DiskFull` naming `path`, what `nbytes()`
    estimates it needs, and `then` (what was kept, what to do)."""
    try:
        yield
    except Exception as e:
        code = no_space(e)
        if code is None:
            raise
        raise DiskFull(path, code, nbytes(), then) from e
