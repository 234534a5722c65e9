"""The patched model: ``eek.patch`` and ``eek.unpatch`` (:mod:`.patch`, with the patched forward),
the one record a patched model carries and its accessors (:mod:`.state`), and the exit files
saved beside a model (:mod:`.exit_files`) and loaded by ``eek.from_pretrained`` (:mod:`.loading`), and
the record of a folder's fit, ``eek_fit.json`` (:mod:`.fit_record`).
"""
