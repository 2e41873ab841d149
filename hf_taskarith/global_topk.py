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

from typing import Callable, Iterable, List, Sequence

import torch

_BINS = 1 << 16


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.detach().abs().to(torch.float32).reshape(-1).view(torch.int32).to(torch.int64)


def kth_largest_magnitudes(
    tensors: Callable[[], Iterable[torch.Tensor]], ks: Sequence[int]
) -> List[float]:
    """The exact k-th largest |x| over every tensor the factory yields, for each k in ``ks``.

    Args:
        tensors: Called once per pass; yields the tensors (any shapes) in the same order each time.
        ks: 1-based ranks (k = 1 is the maximum). k <= 0 gives +inf; k > total gives 0.

    Returns:
        One threshold per k.
    """
    high = torch.zeros(_BINS, dtype=torch.int64)
    total = 0
    for t in tensors():
        b = _bits(t)
        total += b.numel()
        high += torch.bincount(b >> 16, minlength=_BINS)
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
    low = {j: torch.zeros(_BINS, dtype=torch.int64) for j in bins}
    if bins:
        for t in tensors():
            b = _bits(t)
            hi = b >> 16
            for j in bins:
                sel = b[hi == j] & 0xFFFF
                if sel.numel():
                    low[j] += torch.bincount(sel, minlength=_BINS)
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
