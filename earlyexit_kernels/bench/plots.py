"""The suite's plots (matplotlib, Agg backend), drawn from the CSV rows.

- ``speedup_vs_f.png``: speed-up over the full model against the saved fraction ``f``
  of layer evaluations (the ``sched-f*`` patterns), one panel per (model, S, B), one line
  per method and backend (and step, policy or peer where the rows say one), with the layer-count ideal ``1 / (1 - f)`` and the shape-aware
  ideal.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["make_plots"]

METHOD_STYLE = {"eek": "-", "naive": "--", "bs1": ":", "peer": "-."}


def _series(row) -> tuple[str, str]:
    """``(method, what ran)`` of a row: the backend, then its step and policy (eek) or the peer's name."""
    if row["method"] == "peer":
        return row["method"], row.get("peer") or row["backend"]
    parts = [row["backend"], *(row.get(k) for k in ("step", "policy"))]
    return row["method"], ", ".join(p for p in parts if p)


def _num(row, key):
    value = row.get(key)
    return None if value in (None, "") else float(value)


def _speedup_plot(rows: list[dict], path: Path, plt) -> Path | None:
    sched = [
        r
        for r in rows
        if r["kind"] == "e2e" and str(r["pattern"]).startswith("sched-f") and _num(r, "speedup_vs_full") is not None
    ]
    panels = sorted({(r["model"], int(r["S"]), int(r["B"])) for r in sched}, key=lambda k: (k[0] != "bert", k))
    if not panels:
        return None
    cols = min(5, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 3.0 * nrows), squeeze=False, sharey=True)
    for ax, (model, s, b) in zip(axes.flat, panels):
        mine = [r for r in sched if (r["model"], int(r["S"]), int(r["B"])) == (model, s, b)]
        series = sorted({_series(r) for r in mine if r["method"] != "full"})
        fs = sorted({_num(r, "f_actual") for r in mine})
        ax.plot(fs, [1 / (1 - f) for f in fs], color="black", lw=1, label="ideal L*B/sum(exit)")
        shape = {}
        for r in mine:
            shape[_num(r, "f_actual")] = _num(r, "ideal_shape")
        ax.plot(fs, [shape[f] for f in fs], color="gray", lw=1, ls="-.", label="shape-aware ideal")
        for method, backend in series:
            pts = sorted(
                (_num(r, "f_actual"), _num(r, "speedup_vs_full")) for r in mine if _series(r) == (method, backend)
            )
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                ls=METHOD_STYLE.get(method, "-"),
                marker="o",
                ms=3,
                label=f"{method} ({backend})",
            )
        ax.axhline(1.0, color="lightgray", lw=0.8)
        ax.set_title(f"{model} B={b} S={s}", fontsize=9)
        ax.set_xlabel("f (layer evaluations saved)", fontsize=8)
        ax.set_yscale("log", base=2)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    axes[0][0].set_ylabel("speed-up vs full model")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8)
    first = rows[0]
    fig.suptitle(
        f"Speed-up vs f - {first.get('device_name', '')}, {first.get('config', '')} {first.get('dtype', '')}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """Draw the plots of ``rows`` (CSV rows or the suite's dicts) into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [{k: ("" if v is None else v) for k, v in r.items()} for r in rows]
    out_dir = Path(out_dir)
    made = [
        _speedup_plot(rows, out_dir / "speedup_vs_f.png", plt),
    ]
    return [p for p in made if p is not None]
