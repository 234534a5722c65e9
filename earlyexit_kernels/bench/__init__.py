"""The end-to-end benchmark suite: ``python -m earlyexit_kernels.bench``.

Measures, in one process, with the same weights, dtype and attention implementation:

- ``full``: the unpatched Hugging Face model (every layer on every sequence), eager;
- ``peer`` (CUDA): the unpatched model captured in a CUDA graph, and compiled with
  ``torch.compile(mode="reduce-overhead")`` (:mod:`.peers`); the ratios are also taken against the
  fastest unpatched model;
- ``eek``: the patched model (:func:`earlyexit_kernels.patch`), once per backend available
  on the device and per step asked for (``--step``: ``exact``, ``graphed``, ``auto``), with a
  :class:`~earlyexit_kernels.Scheduled` policy replaying an exit pattern and, with
  ``--policies scheduled,entropy``, an ``Entropy`` policy whose exit heads are set so that the
  rows exit on the same pattern (:mod:`.threshold_pattern`);
- ``naive``: the same exits with the exit step in eager PyTorch and compaction by boolean
  indexing (``h = h[keep]``), the way batched FastBERT/DeeBERT ports do it
  (:mod:`.baselines`);
- ``bs1``: each sequence run alone with a Python ``if`` per layer, as the research code does;

and the two ideals (:mod:`.ideal`): the layer count ``L*B/sum(exit_layer)`` and the
shape-aware ideal built from the measured time of one layer at each active batch size
and trimmed sequence length. Exit patterns are in :mod:`.patterns`, exit-step and
compaction microbenchmarks in :mod:`.micro`, the CSV schema in :mod:`.results`, the
plots in :mod:`.plots` and the results section of ``docs/benchmarks.md`` in :mod:`.report`.
"""
