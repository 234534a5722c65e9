"""Running a patched encoder: the exit heads (:mod:`.heads`), the per-batch early-exit loop
(:mod:`.batch_loop`), and the continuous engine for many sequences: the scheduling rule
(:mod:`.scheduler`), the runner that executes it (:mod:`.continuous`), ``eek.classify``
(:mod:`.classify`) and the engine on a thread of its own (:mod:`.background`).
"""
