"""Which crossing should the audit watch warn on? Simulated streams against a 1% budget at 95% (issue 42).

Finished investigation: the upper bound warned of 9 of 20 healthy streams, the lower bound of none while
warning in all 20 at 1.5-2x the budget: the watch warns on the lower bound (docs/serving.md, "The audit
watch").

For each served risk (a multiple of the budget), STREAMS random streams of SEQUENCES audited
sequences, each a disagreement with that probability, recorded 16 at a time into an
``eek.AuditWatch``. Two rules are counted:

- ``lower``: the watch's own rule: warn when the disagreements *show* the risk over the budget
  (its lower confidence bound passes it), once per crossing (``watch.warnings``);
- ``upper``: warn when the upper confidence bound passes the budget after having been at or
  under it (``watch.bound()`` crossing upward), once per crossing.

A rule that warns of a healthy model (risk at half the budget) cries wolf; one that never warns
at twice the budget watches nothing. The figures in docs/serving.md and engine/entry/audit.py came from

    .venv/bin/python benchmarks/archive/audit_warning_rule.py
"""

import argparse
import logging
import random

from earlyexit_kernels.engine.entry.audit import AuditWatch

MULTIPLES = (0.5, 0.9, 1.5, 2.0)


def stream(risk: float, sequences: int, seed: int, budget: float, confidence: float) -> dict:
    rng = random.Random(seed)
    watch = AuditWatch(1.0, budget=budget, confidence=confidence, seed=seed)
    upper_warnings, certified, first_lower = 0, False, None
    for start in range(0, sequences, 16):
        watch.record([1.0 if rng.random() < risk else 0.0 for _ in range(16)])
        over = watch.bound() > budget
        if not over:
            certified = True
        elif certified:
            upper_warnings += 1
            certified = False
        if watch.warnings and first_lower is None:
            first_lower = start + 16
    return {"lower": watch.warnings, "upper": upper_warnings, "first_lower": first_lower}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--sequences", type=int, default=20_000)
    parser.add_argument("--budget", type=float, default=0.01)
    parser.add_argument("--confidence", type=float, default=0.95)
    args = parser.parse_args()
    logging.getLogger("earlyexit_kernels.audit").setLevel(logging.ERROR)
    print(
        f"{args.streams} streams of {args.sequences} audited sequences, budget {100 * args.budget:g}%, "
        f"confidence {args.confidence:g}"
    )
    for multiple in MULTIPLES:
        runs = [
            stream(multiple * args.budget, args.sequences, seed, args.budget, args.confidence)
            for seed in range(args.streams)
        ]
        firsts = [r["first_lower"] for r in runs if r["first_lower"] is not None]
        print(
            f"risk {multiple:g} x budget: lower-bound rule warned in {sum(r['lower'] > 0 for r in runs)} streams "
            f"({sum(r['lower'] for r in runs)} warnings; the last stream's first warning after "
            f"{max(firsts) if firsts else '-'} sequences), upper-bound rule in {sum(r['upper'] > 0 for r in runs)} "
            f"streams ({sum(r['upper'] for r in runs)} warnings)"
        )


if __name__ == "__main__":
    main()
