"""The `mgjax` command (the console script and `python -m mgjax`): Ctrl-C and SIGTERM are handled from here
on, before the command's modules (JAX, Flax, torch) are imported, so a signal at any moment of start-up ends
with the command's one line (`mgjax.interrupt`)."""

import sys

from mgjax import interrupt


def command() -> None:
    try:
        with interrupt.handled():
            from mgjax.cli import main

            code = main(exit_on_signal=True)
    except (KeyboardInterrupt, interrupt.Terminated) as e:  # before main's own handling began
        code = interrupt.stopped(e, interrupt.command_name(sys.argv[1:]), exit_now=True)
    sys.exit(code)


if __name__ == "__main__":
    command()
