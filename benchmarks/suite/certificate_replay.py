"""The replay of online re-certification on recorded pools, and the section it writes (issue 55).

``benchmarks/statistics/recertify_replay.py`` records each candidate's per-row disagreement and layers on
the real task's rows (:class:`Pool`), then replays audited streams through
:class:`~earlyexit_kernels.calibration.online.OnlineCertificate` here: stationary streams
against the path's oracle and a one-shot test, drift streams forked from them, and the share of
windows served over the budget (:func:`run_replays`); :func:`render` writes the Markdown section of
docs/benchmarks.md. The suite checks the replay on synthetic pools (``python_tests/test_recertify_replay.py``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import statistics
import threading
import time
from dataclasses import dataclass

import torch

from earlyexit_kernels.calibration.online import OnlineCertificate
from earlyexit_kernels.methods.risk_control import binomial_p_value

__all__ = [
    "AUDIT",
    "END",
    "START",
    "Plan",
    "Pool",
    "Replay",
    "draws_for",
    "one_shot_index",
    "oracle_index",
    "reduced_path",
    "render",
    "replay_seed",
    "run_replays",
    "sentinel",
    "stationary_summary",
]

START, END = "<!-- recertify-replay:start -->", "<!-- recertify-replay:end -->"
#: the share of served rows the audit runs through the full model too
AUDIT = 0.05
CHECKPOINTS = (1000, 5000, 20000)
DRIFT_AT, POST = 5000, 5000
WINDOW_ROWS = 1000
REPLAYS = 200
DRIFT_REPLAYS = 200
CHUNK = 250


@dataclass(frozen=True)
class Plan:
    """The replays' sizes, in audited rows: stationary streams run to the last checkpoint; a drift stream is the
    first ``drift_at`` rows of the stationary stream of its seed, then ``post`` rows of the drift pool."""

    checkpoints: tuple[int, ...] = CHECKPOINTS
    drift_at: int = DRIFT_AT
    post: int = POST
    window: int = WINDOW_ROWS
    replays: int = REPLAYS
    drift_replays: int = DRIFT_REPLAYS
    chunk: int = CHUNK

    def as_dict(self) -> dict:
        return {**vars(self), "checkpoints": list(self.checkpoints)}


@dataclass
class Pool:
    """One population of rows: each candidate's disagreement ``losses`` [M, n] and ``layers`` [M, n] on it."""

    name: str
    losses: torch.Tensor
    layers: torch.Tensor
    description: str = ""

    @property
    def rows(self) -> int:
        return self.losses.shape[1]

    @property
    def risk(self) -> torch.Tensor:
        return self.losses.double().mean(1)

    @property
    def mean_layers(self) -> torch.Tensor:
        return self.layers.double().mean(1)

    def candidates(self, keep: torch.Tensor) -> Pool:
        return Pool(self.name, self.losses[keep], self.layers[keep], self.description)


def oracle_index(pool: Pool, budget: float) -> int:
    """The candidate with the fewest mean layers on ``pool`` whose disagreement there is within ``budget`` (the
    first of equals); 0 (never exit early) when none is."""
    within = [m for m in range(pool.losses.shape[0]) if float(pool.risk[m]) <= budget + 1e-12]
    if not within:
        return 0
    layers = pool.mean_layers
    return min(within, key=lambda m: (float(layers[m]), m))


def sentinel(pools, start: int, budget: float, factor: float = 2.0) -> int:
    """The first candidate after ``start`` whose risk is at least ``factor`` times the budget on every pool of
    ``pools``: the last candidate a replay keeps (:func:`reduced_path`); the path's last when none is."""
    risks = torch.stack([pool.risk for pool in pools]).min(0).values
    over = [m for m in range(start + 1, risks.shape[0]) if float(risks[m]) >= factor * budget]
    return over[0] if over else risks.shape[0] - 1


def reduced_path(pools, start: int, budget: float) -> list[int]:
    """The candidates a replay feeds the certificate (the detector's cost grows with them), as path indices.

    What is served is the last candidate of the leading run of those certified (never less than
    the epoch's floor: ``start``, then 0), each candidate's e-process reads its own losses only,
    and the alarm reads the served one's. So (1) the candidates after the :func:`sentinel` never
    change what is served while the sentinel is not served (:class:`Replay` checks it); (2) a run
    of consecutive candidates with the same loss on every row of every pool is certified at the
    same row, all together, and serves its last: one of them (the last) stands for the run, with
    ``start`` and 0 runs of their own."""
    last = sentinel(pools, start, budget)
    losses = torch.cat([pool.losses[: last + 1] for pool in pools], 1)
    return [m for m in range(last + 1) if m in (0, start, start - 1, last) or not torch.equal(losses[m], losses[m + 1])]


def copy_certificate(certificate: OnlineCertificate) -> OnlineCertificate:
    """An independent copy of ``certificate`` (its state deep-copied, a lock of its own)."""
    clone = object.__new__(type(certificate))
    state = {key: value for key, value in vars(certificate).items() if key != "_lock"}
    clone.__dict__.update(copy.deepcopy(state))
    clone._lock = threading.Lock()
    return clone


class Replay:
    """A certificate on the candidates ``keep`` of ``path`` (path indices, ``start`` among them) fed audited rows;
    :meth:`served` and :attr:`moves` in path indices."""

    def __init__(self, path, keep, start: int, budget: float, confidence: float, chunk: int = CHUNK):
        self.keep = torch.as_tensor(keep, dtype=torch.long)
        self.start, self.chunk = start, chunk
        self.certificate = OnlineCertificate(
            [path[int(m)] for m in self.keep],
            start=list(map(int, self.keep)).index(start),
            budget=budget,
            confidence=confidence,
            window=0,
        )

    def feed(self, pool: Pool, draws: torch.Tensor) -> None:
        """Audited rows ``draws`` (row indices) of ``pool``, given on :attr:`keep`'s candidates only."""
        for begin in range(0, draws.shape[0], self.chunk):
            rows = draws[begin : begin + self.chunk]
            self.certificate.observe(pool.losses[:, rows], pool.layers[:, rows])

    def fork(self) -> Replay:
        clone = object.__new__(Replay)
        clone.keep, clone.start, clone.chunk = self.keep, self.start, self.chunk
        clone.certificate = copy_certificate(self.certificate)
        return clone

    @property
    def moves(self) -> list:
        """The moves, their indices and ``to_policy``/``from_policy`` those of the path."""
        moves = []
        for move in self.certificate.moves:
            fixed = dataclasses.replace(move)
            fixed.from_index, fixed.to_index = int(self.keep[move.from_index]), int(self.keep[move.to_index])
            moves.append(fixed)
        return moves

    def served(self) -> torch.Tensor:
        return served_after(self.start, self.moves, self.certificate.audited)


def served_after(start: int, moves, total: int) -> torch.Tensor:
    """The candidate served after each number of audited rows 0..``total``, from the moves (``Move.audited``:
    the audited rows when it moved)."""
    served = torch.full((total + 1,), start, dtype=torch.long)
    for move in moves:  # in order: a later move overrides from its row on
        served[move.audited :] = move.to_index
    return served


def draws_for(pool: Pool, rows: int, seed: int, stream: int = 0) -> torch.Tensor:
    """``rows`` uniform row indices of ``pool``: the audited rows of ``seed``'s stream number ``stream``."""
    generator = torch.Generator().manual_seed(seed * 1_000 + stream)
    return torch.randint(pool.rows, (rows,), generator=generator)


def replay_seed(
    path, start: int, budget: float, confidence: float, test: Pool, drifts, plan: Plan, seed: int, keep=None
):
    """One seed: the stationary stream, and the drift streams forked from it at ``plan.drift_at`` audited rows.
    Returns ``(stationary Replay, [drift Replay])``; on ``keep`` (None: the whole path); replayed on the whole
    path when a stream served :func:`reduced_path`'s last candidate."""
    indices = list(range(len(path))) if keep is None else keep
    index = torch.tensor(indices)
    test_kept, drifts_kept = test.candidates(index), [drift.candidates(index) for drift in drifts]
    draws = draws_for(test, plan.checkpoints[-1], seed)
    stationary = Replay(path, indices, start, budget, confidence, plan.chunk)
    stationary.feed(test_kept, draws[: plan.drift_at])
    branches = [stationary.fork() for _ in drifts_kept]
    stationary.feed(test_kept, draws[plan.drift_at :])
    for number, (branch, drift) in enumerate(zip(branches, drifts_kept), 1):
        branch.feed(drift, draws_for(drift, plan.post, seed, number))
    if keep is not None and any(bool((r.served() == indices[-1]).any()) for r in [stationary, *branches]):
        if indices[-1] != len(path) - 1:
            return replay_seed(path, start, budget, confidence, test, drifts, plan, seed, None)
    return stationary, branches


def one_shot_index(pool: Pool, rows: torch.Tensor, budget: float, confidence: float) -> int:
    """What a one-shot certificate on audited ``rows`` of ``pool`` gives (``eek calibrate --from-audit``'s test:
    the path in order, each candidate's exact binomial p-value at ``1 - confidence``, read once): the last of
    the leading run that passes; 0 when none does."""
    counts = pool.losses[:, rows].sum(1)
    passing = counts <= _largest_passing_count(rows.shape[0], budget, confidence) + 0.5
    return max(int(torch.cumprod(passing.int(), 0).sum()) - 1, 0)


@functools.cache
def _largest_passing_count(rows: int, budget: float, confidence: float) -> int:
    """The most disagreements in ``rows`` whose binomial p-value of "risk > budget" is <= 1 - confidence (-1: none)."""
    count = -1
    while binomial_p_value(count + 1, rows, budget) <= 1.0 - confidence:
        count += 1
    return count


def slot_risk(served: torch.Tensor, pool: Pool, first: int, last: int) -> torch.Tensor:
    """The exact risk on ``pool`` of the candidate served while audited rows ``first + 1 .. last`` arrive
    (served after ``first .. last - 1`` rows): [last - first]."""
    return pool.risk[served[first:last]]


def stationary_summary(
    served: torch.Tensor, pool: Pool, budget: float, plan: Plan, draws: torch.Tensor | None = None, confidence=0.95
) -> dict:
    """The served candidate's mean layers and risk at the checkpoints (and, with the stream's ``draws``, the
    one-shot certificate's on the rows audited so far: :func:`one_shot_index`), and the windows over the budget."""
    total = served.shape[0] - 1
    one_shot = {}
    if draws is not None:
        for rows in plan.checkpoints:
            index = one_shot_index(pool, draws[:rows], budget, confidence)
            one_shot[str(rows)] = {"one_shot_index": index, "one_shot_layers": float(pool.mean_layers[index])}
    risks, window = slot_risk(served, pool, 0, total), plan.window
    windows = [float(risks[s : s + window].mean()) for s in range(0, total - window + 1, window)]
    return {
        "checkpoints": {
            str(rows): {
                "index": int(served[rows]),
                "mean_layers": float(pool.mean_layers[served[rows]]),
                "risk": float(pool.risk[served[rows]]),
                **one_shot.get(str(rows), {}),
            }
            for rows in plan.checkpoints
            if rows <= total
        },
        "windows": len(windows),
        "windows_over": sum(risk > budget for risk in windows),
        "ever_over": bool((risks > budget).any()),
        "worst_window_risk": max(windows) if windows else None,
    }


def drift_summary(served: torch.Tensor, moves, drift: Pool, budget: float, at: int) -> dict:
    """The pull-back after the switch at ``at`` audited rows, and the served risk on ``drift`` after it."""
    total = served.shape[0] - 1
    before = [m for m in moves if m.direction == "tighter" and m.audited <= at]
    after = [m for m in moves if m.direction == "tighter" and m.audited > at]
    risks = slot_risk(served, drift, at, total)
    pulled = after[0].audited - at if after else None
    return {
        "served_at_switch": int(served[at]),
        "risk_at_switch": float(drift.risk[served[at]]),
        "pulled_back_after": pulled,
        "pull_backs_before_switch": len(before),
        "pull_backs_after_switch": len(after),
        "post_risk": float(risks.mean()),
        "post_risk_until_pull_back": float(risks[:pulled].mean()) if pulled else None,
        "post_risk_after_pull_back": float(risks[pulled:].mean()) if pulled and pulled < len(risks) else None,
        "end_index": int(served[-1]),
        "end_mean_layers": float(drift.mean_layers[served[-1]]),
        "end_risk": float(drift.risk[served[-1]]),
    }


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_replays(path, start: int, budget: float, confidence: float, test: Pool, drifts: list[Pool], plan: Plan):
    """(a), (b) and (c) on recorded pools; returns the result's ``replay`` part."""
    started = time.perf_counter()
    keep = reduced_path([test, *drifts], start, budget)
    oracle = oracle_index(test, budget)
    stationary, drift_runs = [], [[] for _ in drifts]
    whole = 0
    for seed in range(plan.replays):
        branched = drifts if seed < plan.drift_replays else []
        replay, branches = replay_seed(path, start, budget, confidence, test, branched, plan, seed, keep)
        whole += replay.keep.shape[0] == len(path) and len(keep) < len(path)
        moves = replay.moves
        draws = draws_for(test, plan.checkpoints[-1], seed)
        summary = stationary_summary(replay.served(), test, budget, plan, draws, confidence)
        summary["pull_backs"] = sum(m.direction == "tighter" for m in moves)
        if seed == 0:
            summary["moves"] = [m.as_dict() for m in moves]
        stationary.append(summary)
        for runs, branch, drift in zip(drift_runs, branches, drifts):
            runs.append(drift_summary(branch.served(), branch.moves, drift, budget, plan.drift_at))
    seconds = time.perf_counter() - started
    windows = sum(s["windows"] for s in stationary)
    over = sum(s["windows_over"] for s in stationary)
    oracle_layers = float(test.mean_layers[oracle])
    checkpoints = {}
    for rows in plan.checkpoints:
        layers = [s["checkpoints"][str(rows)]["mean_layers"] for s in stationary]
        checkpoints[str(rows)] = {
            "median_layers": statistics.median(layers),
            "p90_layers": _quantile(layers, 0.9),
            "within_0_3": sum(value <= oracle_layers + 0.3 + 1e-9 for value in layers) / len(layers),
            "one_shot_median_layers": statistics.median(
                s["checkpoints"][str(rows)]["one_shot_layers"] for s in stationary
            ),
        }
    drift_results = []
    for drift, runs in zip(drifts, drift_runs):
        pulled = [r["pulled_back_after"] for r in runs if r["pulled_back_after"] is not None]
        breaks = [r for r in runs if r["risk_at_switch"] > budget]
        drift_oracle = oracle_index(drift, budget)
        drift_results.append(
            {
                "name": drift.name,
                "description": drift.description,
                "rows": drift.rows,
                "start_risk": float(drift.risk[start]),
                "oracle_index": drift_oracle,
                "oracle_layers": float(drift.mean_layers[drift_oracle]),
                "streams": len(runs),
                "stream_0": runs[0],
                "breaks_at_switch": len(breaks),
                "pulled_back": len(pulled),
                "pulled_within_2000": sum(p <= 2000 for p in pulled),
                "breaking_pulled_within_2000": sum(
                    r["pulled_back_after"] is not None and r["pulled_back_after"] <= 2000 for r in breaks
                ),
                "median_pulled_after": statistics.median(pulled) if pulled else None,
                "max_pulled_after": max(pulled) if pulled else None,
                "median_risk_at_switch": statistics.median(r["risk_at_switch"] for r in runs),
                "median_post_risk": statistics.median(r["post_risk"] for r in runs),
                "median_end_layers": statistics.median(r["end_mean_layers"] for r in runs),
            }
        )
    return {
        "plan": plan.as_dict(),
        "budget": budget,
        "confidence": confidence,
        "candidates": len(path),
        "candidates_fed": len(keep),
        "replayed_whole": whole,
        "start": start,
        "start_layers": float(test.mean_layers[start]),
        "start_risk": float(test.risk[start]),
        "oracle": oracle,
        "oracle_policy": path[oracle].to_code(4),
        "oracle_layers": oracle_layers,
        "oracle_risk": float(test.risk[oracle]),
        "test_rows": test.rows,
        "replays": plan.replays,
        "stream_0": stationary[0],
        "checkpoints": checkpoints,
        "windows": windows,
        "windows_over": over,
        "share_windows_over": over / windows if windows else None,
        "streams_ever_over": sum(s["ever_over"] for s in stationary),
        "stationary_pull_backs": sum(s["pull_backs"] for s in stationary),
        "seconds": round(seconds, 1),
        "drifts": drift_results,
    }


def render(results: dict) -> str:
    r, fit = results["replay"], results["fit"]
    budget, plan = r["budget"], r["plan"]
    pct = lambda x: f"{100 * x:.2f}%"  # noqa: E731
    s0 = r["stream_0"]
    lines = [
        START,
        f"Measured {results['date']} on {results['cpu']} ({results['command']}, {results['seconds']:.0f} s). "
        f"MiniLM-L6 fine-tuned on Rotten Tomatoes; `eek fit`'s defaults on {fit['rows']:,} unlabelled texts of its "
        f"train split ({fit['train_rows']:,} train the heads, {fit['calibration_rows']:,} certify): "
        f"`{fit['policy']}`, candidate {r['start']} of a path of {r['candidates']}, certified at "
        f"{100 * budget:g} point of disagreement with the full model, {100 * r['confidence']:g}%. "
        f"Audit {100 * AUDIT:g}%: only the audited rows are simulated, each a uniform draw from the pool; the served "
        f"candidate's risk and layers are its exact values on the pool.",
        "",
        f"(a) Stationary, the test split ({r['test_rows']:,} rows): the folder's candidate runs "
        f"{r['start_layers']:.2f} mean layers there ({pct(r['start_risk'])} disagreement); the path's test oracle is "
        f"`{r['oracle_policy']}`, {r['oracle_layers']:.2f} layers ({pct(r['oracle_risk'])}).",
        "",
        "| audited rows | stream 0: served mean layers (disagreement) | "
        f"{r['replays']} streams: median | 90th percentile | within +0.3 of the oracle | one-shot test on the same "
        "rows: median |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for rows in plan["checkpoints"]:
        one, many = s0["checkpoints"][str(rows)], r["checkpoints"][str(rows)]
        lines.append(
            f"| {rows:,} | {one['mean_layers']:.2f} ({pct(one['risk'])}) | {many['median_layers']:.2f} | "
            f"{many['p90_layers']:.2f} | {100 * many['within_0_3']:.0f}% | {many['one_shot_median_layers']:.2f} |"
        )
    streams = r["drifts"][0]["streams"] if r["drifts"] else 0
    lines += [
        "",
        f"(b) Drift: the first {plan['drift_at']:,} audited rows of {streams} of those streams, then "
        f"{plan['post']:,} audited rows of a drift pool. The candidate served at the switch and its disagreement on "
        "the drift pool; the audited rows from the switch to the pull-back to full depth; the served disagreement "
        f"on the drift pool over the {plan['post']:,} audited rows after the switch; the mean layers served at "
        "their end (re-certified on the drift), against the drift pool's oracle.",
        "",
        "| drift pool | rows | folder's candidate there | served at the switch there: median (stream 0) | "
        "over the budget at the switch | pulled back | within 2,000 rows | rows to the pull-back: median (max) | "
        "served after the switch: median (stream 0) | mean layers at the end: median (drift oracle) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for d in r["drifts"]:
        one = d["stream_0"]
        median = (
            "-" if d["median_pulled_after"] is None else f"{d['median_pulled_after']:,.0f} ({d['max_pulled_after']:,})"
        )
        lines.append(
            f"| {d['name']} | {d['rows']:,} | {pct(d['start_risk'])} | {pct(d['median_risk_at_switch'])} "
            f"({pct(one['risk_at_switch'])}) | {d['breaks_at_switch']} of {d['streams']} | {d['pulled_back']} | "
            f"{d['pulled_within_2000']} | "
            f"{median} | {pct(d['median_post_risk'])} ({pct(one['post_risk'])}) | {d['median_end_layers']:.2f} "
            f"({d['oracle_layers']:.2f}) |"
        )
    lines += ["", "The drift pools:", ""]
    lines += [f"- {d['name']}: {d['description']}." for d in r["drifts"]]
    lines += [
        "",
        f"(c) {r['replays']} stationary streams of {plan['checkpoints'][-1]:,} audited rows: {r['windows_over']} of "
        f"{r['windows']:,} windows of {plan['window']:,} audited rows ({100 * r['share_windows_over']:.2f}%) served a "
        f"disagreement over the budget, against 1 - confidence = {100 * (1 - r['confidence']):g}%; "
        f"{r['streams_ever_over']} of {r['replays']} streams ever served a candidate over it; "
        f"{r['stationary_pull_backs']} pull-backs in all.",
    ]
    engine = results.get("engine")
    if engine:
        lines += ["", _render_engine(engine)]
    lines.append(END)
    return "\n".join(lines) + "\n"


def _render_engine(engine: dict) -> str:
    phases = {phase["name"]: phase for phase in engine["phases"]}
    text = "End to end, the same folder through `eek.classify(..., audit=AuditWatch(0.05), recertify=certificate)`"
    if "stationary" in phases:
        p = phases["stationary"]
        text += (
            f": {p['texts']:,} test texts re-drawn ({p['audited']:,} audited, {p['seconds']:.0f} s) served "
            f"{p['mean_layers']:.2f} mean layers, {p['looser_moves']} moves looser, from `{p['served_at_start']}` "
            f"to `{p['served_at_end']}`"
        )
    if "drift" in phases:
        p = phases["drift"]
        pulled = (
            "not pulled back"
            if p["pulled_back_after"] is None
            else f"pulled back after {p['pulled_back_after']:,} audited rows"
        )
        text += (
            f"; then {p['texts']:,} texts re-drawn from the hard rows ({p['audited']:,} audited, {p['seconds']:.0f} s): "
            f"{pulled}, {100 * p['audited_disagreement']:.2f}% disagreement on the audited rows, "
            f"{p['mean_layers']:.2f} mean layers, {p['looser_moves']} moves looser after, serving "
            f"`{p['served_at_end']}` at the end"
        )
    return text + "."
