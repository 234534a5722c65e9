"""Calibration over recorded logits: the tensor code that turns every head's logits on some rows into a policy.

One step per module, each a set of stateless functions over the recorded logits (or over a risk
array per candidate), one floor above :mod:`earlyexit_kernels.methods` (whose
:mod:`~earlyexit_kernels.methods.risk_control` and :mod:`~earlyexit_kernels.methods.anytime_risk`
hold the statistics) and below the engine. Nothing here runs, patches or trains a model: recording
the logits is :func:`earlyexit_kernels.training.calibrate_model.record_exits`.

- :mod:`.record`: :class:`~.record.ExitRecord` (what a model's all-exits forward recorded), the replay of
  a policy on it (the engine's decisions), the references it is scored against;
- :mod:`.row_losses`: each row's loss, the one definition (disagreement, accuracy lost, multi-label,
  a reranker's missed top k) that certificates, the audit and re-certification count;
- :mod:`.candidates`: the candidates of a policy's family, in order: the uncertified search's, the
  certificate's fixed grid, a reranker's, and the per-layer path chosen on validation rows; and how they are
  shown (the policies as code, the accuracy-vs-layers table and plot);
- :mod:`.select`: each candidate scored, and the one operating-point selector (classifiers and
  rerankers) that picks the point a target asks for; :class:`~.select.Goal` and :func:`~.select.choose`
  compose the steps for one record;
- :mod:`.predicted_walk`: where the certificate's walk along a path would stop on calibration rows like
  some validation rows (what the share and the path choice predict with);
- :mod:`.certify`: the certificate: fixed-sequence testing along the candidates, the rows a
  certificate needs (worked out in :mod:`~earlyexit_kernels.methods.risk_control`),
  :class:`~.certify.Certificate`;
- :mod:`.prediction_powered`: unlabelled rows in the certificate of accuracy lost;
- :mod:`.share`: how many training rows a certificate should get, predicted on validation rows;
- :mod:`.online`: :class:`~.online.OnlineCertificate`, the served threshold re-certified from the
  audited rows (the engine takes it by its type);
- :mod:`.rerank`: a cross-encoder's ``ScoreBand`` chosen or certified on the recall of the full
  model's top k.
"""
