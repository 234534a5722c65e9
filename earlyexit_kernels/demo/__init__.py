"""The demos. ``python -m earlyexit_kernels.demo`` (``make demo``): early exit on a real model and
real data, all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes (:mod:`.real_demo`, with the task in
:mod:`.real_task`). ``python -m earlyexit_kernels.demo.report``: the package's synthetic task
(:mod:`.task`), on which every method is trained, calibrated and timed (:mod:`.report`); the
tests and the exit-quality sweep use it.
"""
