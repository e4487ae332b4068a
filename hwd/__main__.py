"""`python -m kopilka.hwd run --config store.toml`: the hwd group without the `hwd` word."""

import sys

from .cli import main

sys.exit(main(["hwd", *sys.argv[1:]]))
