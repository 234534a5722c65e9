"""The early-exit methods a fit takes, by name: at the bottom of the layers and free of torch, so
that ``eek --help`` offers them without importing it.

``METHODS``: the names ``eek fit --method``, :func:`~earlyexit_kernels.training.fit_texts.fit_model`
and :func:`~earlyexit_kernels.training.fit.fit_exit_heads` take, one recipe each in
:data:`earlyexit_kernels.training.recipes.RECIPES` (a test holds them equal, in this order);
``heads`` trains the internal heads of the frozen model (the default).
``UNLABELLED_METHODS``: those whose recipe trains without labels (self-distillation from the
final classifier).
"""

__all__ = ["METHODS", "UNLABELLED_METHODS"]

METHODS = ("heads", "joint", "fastbert", "deebert", "pabee", "palbert", "ensemble", "dact", "smartbert")
UNLABELLED_METHODS = ("heads", "fastbert")
