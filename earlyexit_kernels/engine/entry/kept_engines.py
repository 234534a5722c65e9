"""The continuous engines a patched model keeps between ``eek.classify`` calls, with their CUDA graphs.

On the graphed step (CUDA's default) an engine captures each (layer, rows, length) call once and
replays it (:mod:`earlyexit_kernels.engine.engines.continuous.call_graphs`); an engine made anew for every call would
capture everything again, each capture a warm-up and a graph. So a call borrows the engine its
settings and the heads' weights made before, and gives it back when it has run every sequence it
took in; a call that stops part-way (its iterator dropped) leaves sequences in flight, and its
engine is dropped. One call at a time holds an engine: a second call meanwhile makes its own.

The key holds the engine settings, the model's backend and step, and where the exit heads' weights
are and their versions (:func:`earlyexit_kernels.engine.step.heads.weights_fingerprint`: the fused
heads hold converted copies, which a captured graph reads). A copied or pickled model keeps none.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable

__all__ = ["KeptEngines", "KEPT_ENGINES"]

# Engines kept per model, the most recently returned last: each holds its token pool and graphs.
KEPT_ENGINES = 2


class KeptEngines:
    """Idle engines by key; :meth:`take` lends one (or makes one), :meth:`give_back` keeps it if idle."""

    def __init__(self):
        self._idle: dict[Hashable, object] = {}
        self._lock = threading.Lock()

    def take(self, key: Hashable, make: Callable[[], object]):
        with self._lock:
            engine = self._idle.pop(key, None)
        return make() if engine is None else engine

    def give_back(self, key: Hashable, engine) -> None:
        if not engine.idle:  # a call stopped part-way: sequences still pending or in flight
            return
        with self._lock:
            self._idle.pop(key, None)
            self._idle[key] = engine
            while len(self._idle) > KEPT_ENGINES:
                self._idle.pop(next(iter(self._idle)))

    def __len__(self) -> int:
        return len(self._idle)

    # A cache of this process and device: a copy of the model starts without one.
    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()
