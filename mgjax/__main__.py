"""The `mgjax` command (the console script and `python -m mgjax`): Ctrl-C and SIGTERM are handled from here
on, before the command's modules (JAX, Flax, torch) are imported, so a signal at any moment of start-up ends
with the command's one line (`mgjax.interrupt`).

A process of a multi-process job (`jobenv.in_job`) runs the command in a child that it
watches (`supervise`): when the job's coordinator, process 0, is lost, JAX's C++ runtime aborts every other
process at once with a stack trace that names nobody, before any Python code can run; the parent says it in one
line."""

import os
import signal
import sys

from mgjax import interrupt  # first: the handlers go in before anything slow is imported
from mgjax import jobenv

SUPERVISED = "MGJAX_SUPERVISED"  # set in the child: it runs the command itself
FATAL = b"JAX distributed service detected fatal errors"  # the abort's message (xla/pjrt/distributed/client.h)


def command() -> None:
    if jobenv.in_job() and SUPERVISED not in os.environ:
        sys.exit(supervise([sys.executable, "-m", "mgjax", *sys.argv[1:]], interrupt.command_name(sys.argv[1:])))
    try:
        with interrupt.handled():
            from mgjax.cli import main

            code = main(exit_on_signal=True)
    except (KeyboardInterrupt, interrupt.Terminated) as e:  # before main's own handling began
        code = interrupt.stopped(e, interrupt.command_name(sys.argv[1:]), exit_now=True)
    sys.exit(code)


def supervise(argv: list[str], name: str) -> int:
    """Runs `argv` with SUPERVISED set and returns its exit status, passing its stderr through up to a JAX
    abort for a lost coordinator, which becomes one line and exit 1. Ctrl-C reaches the child from the
    terminal (the same process group); a SIGTERM sent to this process is passed on."""
    import subprocess

    child = subprocess.Popen(argv, env={**os.environ, SUPERVISED: "1"}, stderr=subprocess.PIPE,
                             preexec_fn=_die_with_parent)
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
                signal.SIGTERM: signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))}
    aborted = False
    try:
        for line in child.stderr:
            aborted = aborted or FATAL in line
            if not aborted:  # after it: glog's report and stack trace, Python's last words
                sys.stderr.buffer.write(line)
                sys.stderr.flush()
        code = child.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if aborted and code == -signal.SIGABRT:
        coordinator = os.environ.get("MGJAX_COORDINATOR", "?")
        print(f"mgjax {name}: error: lost the job's coordinator, process 0 ({coordinator}); re-run the same command "
              "on every host to resume from the last checkpoint (training) or the answers written (eval)",
              file=sys.stderr, flush=True)
        return 1
    return code if code >= 0 else 128 - code


def _die_with_parent() -> None:
    """In the child, before the command: SIGKILL when the supervisor dies (a scheduler that kills the process
    it started must not leave the job's real process running). Linux's prctl(PR_SET_PDEATHSIG)."""
    import ctypes

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the child outlives a killed supervisor
        pass


if __name__ == "__main__":
    command()
