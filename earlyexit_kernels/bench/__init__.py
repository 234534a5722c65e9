"""The benchmarks a user runs on their own machine: ``eek bench sweep|stream|serve`` (:mod:`.commands`).

- ``sweep`` (:mod:`.sweep`, :mod:`.runner`): the patched model against the unpatched one (eager; on CUDA also
  captured in a graph, :mod:`.peers`) and the naive ports (:mod:`.baselines`), over batch sizes, lengths and
  exit patterns (:mod:`.patterns`; an ``Entropy`` policy set to exit on them, :mod:`.threshold_pattern`), with
  the layer-count and shape-aware ideals (:mod:`.ideal`); the CSV (:mod:`.results`) and plots (:mod:`.plots`);
- ``stream`` (:mod:`.stream`): one corpus classified five ways, against the token-layer ideal;
- ``serve`` (:mod:`.serve_load`, :mod:`.server_process`): ``eek serve`` on 127.0.0.1, early exit and none.

The studies, the peers of other projects and the writers of ``docs/`` are the repository's ``benchmarks/``.
"""
