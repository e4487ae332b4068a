"""`python -m kopilka.servers.cli`: the same as the `kopilka` command."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
