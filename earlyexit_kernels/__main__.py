"""``python -m earlyexit_kernels``: see :mod:`earlyexit_kernels.integrations.cli`."""

import sys

from earlyexit_kernels.integrations.cli import main

sys.exit(main())
