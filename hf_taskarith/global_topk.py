"""Exact whole-model k-th largest magnitude, in two streaming passes and constant memory.

The TIES, TALL-mask and PCB papers trim over the whole model flattened into one vector; a
7B model's magnitudes do not fit in memory, so we select on bit patterns instead. Non-negative
float32 values order exactly like their int32 bit patterns, so:

1. pass 1 histograms the high 16 bits of every |τ| (65,536 bins) and finds the bin that holds
   the k-th largest value;
2. pass 2 histograms the low 16 bits of the values in that bin, which pins down the exact bit
   pattern of the k-th largest value.

Each pass reads every task vector once, one tensor at a time.
"""

from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Sequence

import torch

_BINS = 1 << 16


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.detach().abs().to(torch.float32).reshape(-1).view(torch.int32).to(torch.int64)


SumOverRanks = Callable[[Optional[torch.Tensor], Optional[BaseException]], torch.Tensor]


def _pass(compute: Callable[[], torch.Tensor], sum_over_ranks: Optional[SumOverRanks]) -> torch.Tensor:
    """Run one local pass; in a multi-process merge, sum its histogram over ranks (or raise on all)."""
    if sum_over_ranks is None:
        return compute()
    try:
        local, error = compute(), None
    except BaseException as err:  # every rank must reach the collective, or the others hang
        local, error = None, err
    return sum_over_ranks(local, error)


def kth_largest_magnitudes(
    tensors: Callable[[], Iterable[torch.Tensor]],
    ks: Sequence[int],
    *,
    sum_over_ranks: Optional[SumOverRanks] = None,
) -> List[float]:
    """The exact k-th largest |x| over every tensor the factory yields, for each k in ``ks``.

    Args:
        tensors: Called once per pass; yields the tensors (any shapes) in the same order each time.
            Tensors may live on any device; histograms are counted there.
        ks: 1-based ranks (k = 1 is the maximum). k <= 0 gives +inf; k > total gives 0.
        sum_over_ranks: In a multi-process merge, each rank's ``tensors`` yields its own part
            of the model and this sums a CPU histogram over ranks (``(local, error) -> summed``;
            it raises on every rank if ``error`` is set on any). Counts are integers, so the
            split changes nothing in the result.

    Returns:
        One threshold per k.
    """

    def first_pass() -> torch.Tensor:
        high, total = None, 0
        for t in tensors():
            b = _bits(t)
            if high is None:
                high = torch.zeros(_BINS, dtype=torch.int64, device=b.device)  # counted where τ lives: no sync per tensor
            high += torch.bincount(b >> 16, minlength=_BINS)
            total += b.numel()
        high = torch.zeros(_BINS, dtype=torch.int64) if high is None else high.cpu()
        return torch.cat([high, torch.tensor([total], dtype=torch.int64)])  # last slot: number of values

    counts = _pass(first_pass, sum_over_ranks)
    high, total = counts[:_BINS], int(counts[_BINS])
    # counts above each bin: rank of the first value in bin j (from the top) = above[j] + 1
    above = high.flip(0).cumsum(0).flip(0) - high
    targets = []
    for k in ks:
        if k <= 0:
            targets.append(None)
            continue
        if k > total:
            targets.append(-1)
            continue
        j = int(torch.nonzero((above < k) & (above + high >= k)).max())
        targets.append((j, k - int(above[j])))  # rank within bin j
    bins = sorted({t[0] for t in targets if isinstance(t, tuple)})

    def second_pass() -> torch.Tensor:
        low = None
        for t in tensors():
            b = _bits(t)
            if low is None:
                low = torch.zeros((len(bins), _BINS), dtype=torch.int64, device=b.device)
            hi = b >> 16
            for row, j in enumerate(bins):
                sel = b[hi == j] & 0xFFFF
                low[row] += torch.bincount(sel, minlength=_BINS)
        return torch.zeros((len(bins), _BINS), dtype=torch.int64) if low is None else low.cpu()

    low_rows = _pass(second_pass, sum_over_ranks) if bins else torch.zeros((0, _BINS), dtype=torch.int64)
    low = {j: low_rows[row] for row, j in enumerate(bins)}
    out: List[float] = []
    for t in targets:
        if t is None:
            out.append(float("inf"))
        elif t == -1:
            out.append(0.0)
        else:
            j, r = t
            counts = low[j]
            above_low = counts.flip(0).cumsum(0).flip(0) - counts
            lo = int(torch.nonzero((above_low < r) & (above_low + counts >= r)).max())
            pattern = torch.tensor([(j << 16) | lo], dtype=torch.int64).to(torch.int32)
            out.append(float(pattern.view(torch.float32)))
    return out
