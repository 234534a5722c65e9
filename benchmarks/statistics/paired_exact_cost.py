"""What the exact paired test costs at the serving audit's window sizes (issue 77): the seconds of one p-value and
of one upper bound, by rows.

The serving audit (``earlyexit_kernels.engine.entry.audit``) bounds the accuracy lost on its latest ``PAIRED_WINDOW``
labelled rows with the betting test after labels arrive; calibration certifies with the exact paired test
(``earlyexit_kernels.methods.paired_exact``). This times the exact test where the audit would read it: rows a
share ``--plus`` at +1 and ``--minus`` at -1, the p-value of "lost <= ``--budget`` points" (the test whose
rejection warns) and the upper 95% bound, each computed once on a cold cache. Bounds past ``--bound-rows`` rows
take minutes and are left out::

    flock -x /tmp/eek-cpu.lock python benchmarks/statistics/paired_exact_cost.py --rows 1000 10000 65536
"""

import argparse
import platform
import time

from earlyexit_kernels.methods.paired_exact import paired_exact_p_value, paired_exact_upper_bound


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 10000, 65536])
    parser.add_argument("--plus", type=float, default=0.04, help="share of rows at +1 (the exit wrong, full right)")
    parser.add_argument("--minus", type=float, default=0.03, help="share of rows at -1")
    parser.add_argument("--budget", type=float, default=1.0, help="points of accuracy lost")
    parser.add_argument("--bound-rows", type=int, default=10000, help="the most rows a bound is timed at")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}: +1 on {args.plus:.0%}, -1 on {args.minus:.0%} of the rows")
    print("| labelled rows | a p-value (s) | a bound (s) |\n|---|---|---|")
    for n in args.rows:
        a, b = round(args.plus * n), round(args.minus * n)
        start = time.perf_counter()
        paired_exact_p_value(b, a, n, -args.budget / 100.0)  # "lost <= budget", on the negated losses
        p_seconds = time.perf_counter() - start
        bound = "not run"
        if n <= args.bound_rows:
            start = time.perf_counter()
            paired_exact_upper_bound(a, b, n, 0.95)
            bound = f"{time.perf_counter() - start:.2f}"
        print(f"| {n:,} | {p_seconds:.2f} | {bound} |")


if __name__ == "__main__":
    main()
