"""``python -m earlyexit_kernels``: see :mod:`earlyexit_kernels.cli`."""

import sys

from .cli import main

sys.exit(main())
