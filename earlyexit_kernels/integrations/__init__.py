"""Where the package meets the outside: Hugging Face models (:mod:`.hf_patch`, saving and
loading in :mod:`.saving`), the command line (:mod:`.cli`, with :mod:`.table_io` and
:mod:`.labels`), Ray Data (:mod:`.ray_data`, public as ``earlyexit_kernels.ray``) and the
HTTP server (:mod:`.server`).
"""
