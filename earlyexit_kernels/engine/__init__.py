"""Running a patched encoder, in six wings whose imports run one way (``python_tests/test_layout.py``):

- :mod:`.entry`: the front doors: ``eek.classify``, reranking, the engine on a thread of its own, the
  engines a process keeps, and the audit that watches a served policy;
- :mod:`.engines`: the engine choice, made once per call, and the engines it chooses from: the CPU's
  continuous engine (:mod:`.engines.continuous`), the GPU's cohorts (the default on CUDA) and the two
  opt-in GPU engines, segments (:mod:`.engines.segments`) and packed tokens (:mod:`.engines.varlen`);
- :mod:`.stream`: what every stream engine has: its config, the stream surface (submission, results,
  statistics), admission, aging and timings;
- :mod:`.graphed`: the graphed step: static buffers, captured step graphs, the captured prologue,
  survivor buckets and the layer-cost table;
- :mod:`.step`: one exact early-exit step over a batch: its start state, inputs, the per-batch loop,
  the heads, the step's choice and the patched record;
- :mod:`.layers`: one encoder layer: precision, the int8 class, ONNX Runtime's and OpenVINO's layers,
  packed layers, varlen attention, module weights.

entry → engines → stream and graphed → step → layers; ``stream`` and ``graphed`` never import each other,
and the continuous engine and the GPU engines never import each other.
"""
