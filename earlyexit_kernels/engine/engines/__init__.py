"""The stream engines and the choice among them (:mod:`.choice`, made once per call):

- :mod:`.continuous`: the CPU's continuous engine, layer calls over a pool of rows;
- :mod:`.cohort_engine`: cohorts on the graphed step, the default on CUDA; :mod:`.launched`: what it
  shares with the opt-in GPU engines;
- :mod:`.segments`: segments of layers, opt-in (``--engine segments``);
- :mod:`.varlen`: packed tokens with varlen attention, opt-in (``--engine varlen``).

The continuous engine and the GPU engines never import each other.
"""
