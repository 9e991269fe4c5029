"""``python -m jqx``: see :mod:`jqx.cli`."""

import sys

from jqx.cli import main

if __name__ == "__main__":
    sys.exit(main())
