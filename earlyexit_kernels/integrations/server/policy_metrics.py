"""What ``/metrics`` says of the served policy while it is re-certified online (``eek serve --recertify``).

- ``eek_policy_threshold{layer}``: the served policy's threshold at each layer (families with one);
- ``eek_policy_candidate``: its index on the folder's certified path (0: never exits early);
- ``eek_policy_epoch``: the epoch (1, plus one per pull-back); ``eek_policy_epoch_audited_rows``:
  audited rows since the epoch began, which the online test reads;
- ``eek_policy_disagreement_rate`` and ``eek_policy_disagreement_bound``: the served candidate's
  disagreement with the full model on those rows and its upper bound at the certificate's
  confidence (a reading at a fixed count; the moves follow the anytime-valid test);
- ``eek_policy_budget``: the budget certified;
- ``eek_policy_mean_layers``: the served candidate's mean layers on those rows;
- ``eek_policy_moves_total{direction}``: moves looser (certified) and tighter (pulled back).

Read from the :class:`~earlyexit_kernels.calibration.online.OnlineCertificate` when scraped.
"""

from __future__ import annotations

__all__ = ["PolicyMetrics"]


class PolicyMetrics:
    """A Prometheus collector of an online certificate's state (see the module docstring)."""

    def __init__(self, certificate, num_layers: int):
        self.certificate, self.num_layers = certificate, num_layers

    def describe(self):
        return list(self.collect())

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        certificate = self.certificate
        thresholds = certificate.thresholds(self.num_layers)
        if thresholds is not None:
            family = GaugeMetricFamily(
                "eek_policy_threshold", "Threshold of the served policy at each layer", labels=["layer"]
            )
            for layer, value in enumerate(thresholds, start=1):
                family.add_metric([str(layer)], value)
            yield family
        rate, layers = certificate.served_risk(), certificate.served_mean_layers()
        gauges = {
            "eek_policy_candidate": ("Index of the served policy on the certified path", certificate.served_index),
            "eek_policy_epoch": ("Epoch of the online test (one more per pull-back)", certificate.epoch),
            "eek_policy_epoch_audited_rows": ("Audited rows since the epoch began", certificate.epoch_rows),
            "eek_policy_budget": ("Budget of disagreement certified online (a fraction)", certificate.budget),
            "eek_policy_disagreement_rate": (
                "Disagreement of the served policy with the full model on the epoch's audited rows",
                0.0 if rate is None else rate,
            ),
            "eek_policy_disagreement_bound": (
                "Upper confidence bound on that disagreement (1 before any audited row)",
                certificate.bound(),
            ),
            "eek_policy_mean_layers": (
                "Mean layers of the served policy on the epoch's audited rows (0 before any)",
                0.0 if layers is None else layers,
            ),
        }
        for name, (documentation, value) in gauges.items():
            yield GaugeMetricFamily(name, documentation, value=float(value))
        moves = CounterMetricFamily(
            "eek_policy_moves", "Moves of the served policy along the certified path", labels=["direction"]
        )
        for direction in ("looser", "tighter"):
            moves.add_metric([direction], certificate.move_counts[direction])
        yield moves
