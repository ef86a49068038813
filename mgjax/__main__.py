"""`python -m mgjax`: the same as the `mgjax` command."""

from mgjax.cli import command

command()
