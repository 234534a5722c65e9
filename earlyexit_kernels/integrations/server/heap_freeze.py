"""The start-up heap left out of Python's oldest garbage collections: a served process freezes it once.

    app.state.freeze_heap = True     # eek serve and each Ray replica: the app's start-up then freezes
    frozen = freeze_startup_heap()   # what the app's start-up does, the model loaded and the engine started

A collection of the oldest generation walks every object the collector tracks and holds the GIL while it
does, so the event loop and the engine's thread both stop. A server holds some 400,000 such objects after
start-up (torch's and transformers' modules, the tokenizer, the app), nearly all of which live as long as
the process; the requests' own objects are freed by reference counting. Measured on the AMD EPYC (MiniLM-L6
int8, one thread, ``benchmarks/profiles/gc_pauses_launcher.py``): one such collection took 226-234 ms at
concurrency 32, and the 32 requests in flight each waited for it; it was the slowest 1% of a 1,024-request level
(``benchmarks/results/amd_epyc/heap_freeze_tail_cpu.md``). ``gc.freeze()`` moves every tracked object
into a permanent generation that later collections skip (what vLLM's and SGLang's servers do after their
start-up): the collections that still run see what was made since.

Frozen objects are never collected. A cycle among start-up objects that later becomes garbage stays in
memory; the collection first run here frees what is already garbage, and a served process keeps its
start-up objects until it exits. For that reason only processes that do nothing but serve ask for it (the app's
``freeze_heap`` state, set by ``eek serve`` and each Ray replica), never an app built from Python in a process
that goes on (tests, notebooks); ``gc.get_objects()`` leaves frozen objects out.
"""

from __future__ import annotations

import gc

__all__ = ["freeze_startup_heap", "frozen_objects"]


def freeze_startup_heap() -> int:
    """Collect what is garbage now, then freeze every object still tracked; returns how many are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def frozen_objects() -> int | None:
    """The objects this process froze (``/info``'s ``gc_frozen_objects``), read from the collector, or None where
    it froze none (an app built from Python, outside ``eek serve`` and Ray replicas)."""
    return gc.get_freeze_count() or None
