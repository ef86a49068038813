"""`python -m mgjax`: the same as the `mgjax` command."""

import sys

from mgjax.cli import main

sys.exit(main())
