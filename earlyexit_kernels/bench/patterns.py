"""Exit patterns the suite replays: with :class:`earlyexit_kernels.Scheduled`, and as an ``Entropy`` policy
whose exit heads are set to follow them (:mod:`.threshold_pattern`).

Every pattern gives each of the ``B`` sequences an exit layer in ``1..L`` and a length
(the number of non-padding tokens, ``S`` when the pattern has no padding). All are
deterministic given the seed.

- ``sched-f<f>``: saves the fraction ``f`` of the ``L*B`` layer evaluations. The budget
  ``T = round((1 - f) * L * B)`` (clamped to ``B..L*B``) is split as evenly as possible:
  every sequence exits at layer ``T // B`` and ``T % B`` of them, chosen by a seeded
  permutation, one layer later. So ``sum(exit_layer) = T`` exactly and the batch shrinks
  in at most two steps (the worst case for compaction is not this, see ``geometric``).
  ``sched-f0.50`` on 12 layers is *every row exits after layer 6*, ``sched-f0.00`` *nobody
  exits early* (:func:`.pattern_names.describe_pattern` says it for any ``L`` and ``B``).
- ``geometric-p<p>``: a realistic spread, ``P(exit at k) = p (1 - p)^(k - 1)`` for ``k < L``
  and the remainder at ``L`` (PonderNet's geometric prior; ``p = 0.1`` saves about 40% of the
  layers, PABEE's published 1.6x). Counts are ``B * P`` rounded by largest remainder, placed
  on a seeded permutation of the rows, so the batch shrinks a little at every layer.
- ``padded-geometric``: mixed lengths, uniform in ``S/8..S`` (one row of length ``S``), right
  padded to ``S``, with the geometric exits given to the longest sequences first: as the long
  ones leave, the engine trims the padding nobody needs, which the full model and the
  naive port cannot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from earlyexit_kernels.bench.pattern_names import describe_pattern

__all__ = [
    "ExitPattern",
    "scheduled",
    "geometric",
    "padded_geometric",
    "standard_patterns",
    "pattern_by_name",
    "check_pattern_name",
    "describe_pattern",
    "make_inputs",
]

FRACTIONS = (0.0, 0.25, 0.5, 0.75)
GEOMETRIC_P = 0.1


@dataclass(frozen=True)
class ExitPattern:
    name: str
    exit_layers: torch.Tensor  # [B] int64 in 1..L
    lengths: torch.Tensor  # [B] int64 in 1..S
    padded: bool
    f_target: float | None = None  # the saved fraction the pattern was built for, if any

    def f_actual(self, num_layers: int) -> float:
        """The fraction of the ``L*B`` layer evaluations the pattern saves."""
        return 1.0 - float(self.exit_layers.sum()) / (num_layers * self.exit_layers.numel())


def scheduled(batch: int, num_layers: int, f: float, seq_len: int, seed: int = 0) -> ExitPattern:
    total = min(max(round((1.0 - f) * num_layers * batch), batch), num_layers * batch)
    base, extra = divmod(total, batch)
    layers = torch.full((batch,), base, dtype=torch.long)
    perm = torch.randperm(batch, generator=torch.Generator().manual_seed(seed))
    layers[perm[:extra]] += 1
    return ExitPattern(f"sched-f{f:.2f}", layers, torch.full((batch,), seq_len), False, f)


def _geometric_layers(batch: int, num_layers: int, p: float) -> torch.Tensor:
    """Exit layers sorted ascending, with counts ``B * pmf`` rounded by largest remainder."""
    pmf = [p * (1 - p) ** (k - 1) for k in range(1, num_layers)]
    pmf.append(1.0 - sum(pmf))
    raw = [batch * q for q in pmf]
    counts = [int(r) for r in raw]
    order = sorted(range(num_layers), key=lambda k: raw[k] - counts[k], reverse=True)
    for k in order[: batch - sum(counts)]:
        counts[k] += 1
    return torch.repeat_interleave(torch.arange(1, num_layers + 1), torch.tensor(counts))


def geometric(batch: int, num_layers: int, seq_len: int, p: float = GEOMETRIC_P, seed: int = 0) -> ExitPattern:
    layers = _geometric_layers(batch, num_layers, p)
    perm = torch.randperm(batch, generator=torch.Generator().manual_seed(seed))
    return ExitPattern(f"geometric-p{p:.2f}", layers[perm], torch.full((batch,), seq_len), False)


def padded_geometric(batch: int, num_layers: int, seq_len: int, p: float = GEOMETRIC_P, seed: int = 0) -> ExitPattern:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, seq_len // 8), seq_len + 1, (batch,), generator=g)
    lengths[torch.randint(0, batch, (1,), generator=g)] = seq_len
    layers = torch.empty(batch, dtype=torch.long)
    layers[torch.argsort(lengths, descending=True, stable=True)] = _geometric_layers(batch, num_layers, p)
    return ExitPattern("padded-geometric", layers, lengths, True)


def standard_patterns(batch: int, num_layers: int, seq_len: int, fractions=FRACTIONS) -> list[ExitPattern]:
    patterns = [scheduled(batch, num_layers, f, seq_len) for f in fractions]
    patterns.append(geometric(batch, num_layers, seq_len))
    patterns.append(padded_geometric(batch, num_layers, seq_len))
    return patterns


def check_pattern_name(name: str) -> str:
    """``name`` where it names a pattern (``sched-f<f>``, ``geometric-p<p>``, ``padded-geometric``), else ``ValueError``."""
    try:
        if name.startswith("sched-f") and 0.0 <= float(name.removeprefix("sched-f")) < 1.0:
            return name
        if name.startswith("geometric-p") and 0.0 < float(name.removeprefix("geometric-p")) < 1.0:
            return name
    except ValueError:
        pass
    if name == "padded-geometric":
        return name
    raise ValueError(
        f"unknown exit pattern {name!r}: sched-f<f> with 0 <= f < 1 (sched-f0.50), geometric-p<p> with "
        f"0 < p < 1 (geometric-p0.10) or padded-geometric"
    )


def pattern_by_name(name: str, batch: int, num_layers: int, seq_len: int) -> ExitPattern:
    """The pattern ``name`` (see :func:`check_pattern_name`) for ``batch`` rows of ``seq_len`` tokens."""
    check_pattern_name(name)
    if name.startswith("sched-f"):
        return scheduled(batch, num_layers, float(name.removeprefix("sched-f")), seq_len)
    if name.startswith("geometric-p"):
        return geometric(batch, num_layers, seq_len, p=float(name.removeprefix("geometric-p")))
    return padded_geometric(batch, num_layers, seq_len)


def make_inputs(pattern: ExitPattern, seq_len: int, vocab: int, pad_id: int, device, seed: int = 0):
    """``input_ids`` [B, S] (random tokens, ``pad_id`` after each length) and the 0/1 mask."""
    g = torch.Generator().manual_seed(seed)
    batch = pattern.lengths.numel()
    ids = torch.randint(5, vocab, (batch, seq_len), generator=g)
    mask = (torch.arange(seq_len)[None, :] < pattern.lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_id))
    return ids.to(device), mask.to(device)
