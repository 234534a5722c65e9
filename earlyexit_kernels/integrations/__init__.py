"""Where the package meets the outside: the command line (:mod:`.cli`, with :mod:`.table_io` and
:mod:`.labels`; ``eek fit`` in :mod:`.fit_cli`), model folders (:mod:`.model_folder`), evaluation
(:mod:`.evaluation`), Ray Data (:mod:`.ray_data`, public as ``earlyexit_kernels.ray``) and the
HTTP server (:mod:`.server`). The patched model itself is :mod:`earlyexit_kernels.patching`.
"""
