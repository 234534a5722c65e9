"""Triton kernels of earlyexit_kernels, one module per kernel (kernel and launcher), their
``torch.library`` registrations apart, and the wrappers with the reference's signatures.

- :mod:`.exit_head`: the default head (``tanh`` pooler and the head's partial logits).
- :mod:`.exit_decide`: the exit decision of every policy, with the write-back and survivor order.
- :mod:`.exit_step_ops`: both launchers registered as ``earlyexit::exit_head`` and
  ``earlyexit::exit_decide`` (what ``torch.compile`` and dispatch modes see).
- :mod:`.exit_step`: the wrappers (``exit_step``, ``head_exit_step`` and their write-back forms),
  lowering a policy to the decision's arguments.
- :mod:`.compact`: the compaction gather (``earlyexit::compact``).

Importing these modules needs ``triton``; :mod:`earlyexit_kernels.backends.triton_backend`
registers them as the ``"triton"`` backend when it is importable.
"""
