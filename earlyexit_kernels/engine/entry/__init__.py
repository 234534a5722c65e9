"""The engine's front doors: ``eek.classify`` (:mod:`.classify`), reranking, the engine on a thread of its
own (:mod:`.background`), the engines a process keeps and the audit of a served policy.

The top wing of :mod:`earlyexit_kernels.engine`.
"""
