"""``python -m earlyexit_kernels.demo`` (``make demo``): the real-data demo, :mod:`.real_demo`."""

from earlyexit_kernels.demo.real_demo import main

main()
