"""Exact top-k threshold alternatives on one large tensor (issue 9): time and exactness.

    python tests/bench/topk_bench.py [--rows 5632 --cols 2048] [--density 0.2] [--repeats 5] [--json OUT]

The trim step of TIES/breadcrumbs/magnitude_prune needs the k-th largest |τ| (k = int(density·n))
of every tensor. Candidates, all exact:

* ``torch.sort``: sort everything, index;
* ``torch.topk``: the k largest, take the smallest of them;
* ``torch.kthvalue``: quickselect on the (n−k+1)-th smallest;
* radix select: non-negative float32 values order like their int32 bit patterns, so a
  ``bincount`` of the high 16 bits finds the bin holding the k-th largest and a second ``bincount``
  of the low 16 bits of that bin's members pins the exact bit pattern (what ``global_topk.py``
  does over a whole model, here on one tensor);
* ``methods._kth_largest`` (what the torch methods in ``hf_taskarith/methods.py`` use): sort a
  fixed-seed sample of 2^18 entries, bracket the k-th largest by ±8σ of its sample rank,
  count/select inside the bracket with ``kthvalue``; verified by counts, so exact;
* ``kernels._select`` (what the fused CPU kernels use for full finetunes): the radix select above
  as two numba histogram passes that form τ = θ − θ0 and |τ| themselves (given θ0 = 0 here, so it
  also pays for reading a zero base), on ``torch.get_num_threads()`` threads.

Each candidate gets |τ| precomputed (the ``abs`` pass is timed separately) and must return the
same value, bit for bit, as ``torch.kthvalue``. Two inputs: a continuous one (fp32 Gaussian, no
ties) and a realistic one (a bf16 finetune minus its bf16 base: few distinct values, many ties at
the threshold). ``topk_mask`` (exactly k entries, ties broken towards the lower index) is timed
and checked too. Runs are interleaved (candidate order rotates each repeat) and the median is
reported, because the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from hf_taskarith import methods  # noqa: E402

_BINS = 1 << 16


def by_sort(a: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(a).values[a.numel() - k]


def by_topk(a: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(a, k, sorted=False).values.min()


def by_kthvalue(a: torch.Tensor, k: int) -> torch.Tensor:
    return torch.kthvalue(a, a.numel() - k + 1).values


def by_radix(a: torch.Tensor, k: int) -> torch.Tensor:
    """Two 16-bit bincount passes over the int32 bit patterns of non-negative float32 values."""
    bits = a.view(torch.int32)
    hi = bits >> 16  # non-negative: sign bit is 0
    high = torch.bincount(hi, minlength=_BINS)
    above = high.flip(0).cumsum(0).flip(0) - high  # entries in higher bins
    j = int(torch.nonzero((above < k) & (above + high >= k)).max())
    r = k - int(above[j])
    low = torch.bincount(bits[hi == j] & 0xFFFF, minlength=_BINS)
    above_low = low.flip(0).cumsum(0).flip(0) - low
    lo = int(torch.nonzero((above_low < r) & (above_low + low >= r)).max())
    return torch.tensor([(j << 16) | lo], dtype=torch.int32).view(torch.float32)[0]


def by_methods(a: torch.Tensor, k: int) -> torch.Tensor:
    return methods._kth_largest(a, k)


_ZEROS: Dict[int, torch.Tensor] = {}


def by_kernel(a: torch.Tensor, k: int) -> torch.Tensor:
    from hf_taskarith import kernels

    zeros = _ZEROS.setdefault(a.numel(), torch.zeros(a.numel()))
    v, _ = kernels._select(zeros.numpy(), a.numpy(), k)
    return torch.tensor([v], dtype=torch.int64).to(torch.int32).view(torch.float32)[0]


CANDIDATES: Dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "torch.sort": by_sort,
    "torch.topk": by_topk,
    "torch.kthvalue": by_kthvalue,
    "radix select (2×16-bit bincount)": by_radix,
    "methods._kth_largest (sampled bracket; torch path)": by_methods,
}
try:  # the fused kernels need numba
    from hf_taskarith import kernels as _kernels

    if _kernels.available():
        CANDIDATES["kernels._select (numba radix, τ and |·| fused; CPU kernel path)"] = by_kernel
except ImportError:  # pragma: no cover
    pass


def inputs(rows: int, cols: int) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(rows, cols, generator=g)
    base = (0.02 * torch.randn(rows, cols, generator=g)).to(torch.bfloat16)
    ft = (base.float() + 0.002 * torch.randn(rows, cols, generator=g)).to(torch.bfloat16)
    return {
        "fp32 Gaussian (no ties)": gauss,
        "bf16 finetune − bf16 base (ties)": ft.float() - base.float(),
    }


def run(rows: int, cols: int, density: float, repeats: int) -> dict:
    torch.manual_seed(0)
    out = {"shape": [rows, cols], "density": density, "threads": torch.get_num_threads(), "inputs": {}}
    for label, x in inputs(rows, cols).items():
        n = x.numel()
        k = int(density * n)
        a = x.reshape(-1).abs()
        ref = by_kthvalue(a, k)
        times: Dict[str, List[float]] = {name: [] for name in CANDIDATES}
        exact: Dict[str, bool] = {}
        abs_times, mask_times = [], []
        names = list(CANDIDATES)
        for rep in range(repeats):
            order = names[rep % len(names):] + names[: rep % len(names)]
            for name in order:
                t0 = time.perf_counter()
                v = CANDIDATES[name](a, k)
                times[name].append(time.perf_counter() - t0)
                ok = bool(torch.equal(v.reshape(()).view(torch.int32), ref.reshape(()).view(torch.int32)))
                exact[name] = exact.get(name, True) and ok
            t0 = time.perf_counter()
            a2 = x.reshape(-1).abs()
            abs_times.append(time.perf_counter() - t0)
            del a2
            t0 = time.perf_counter()
            mask = methods.topk_mask(x, k)
            mask_times.append(time.perf_counter() - t0)
        # topk_mask: exactly k, every kept |x| >= every dropped |x|, ties at the threshold by lowest index
        cnt = int(mask.sum())
        flat = mask.reshape(-1)
        kept_min = a[flat].min()
        dropped_max = a[~flat].max() if cnt < n else torch.tensor(0.0)
        tied = torch.nonzero(a == ref).reshape(-1)
        n_above = int((a > ref).sum())
        want_tied = tied[: k - n_above]
        mask_ok = (
            cnt == k and bool(kept_min >= dropped_max) and bool(flat[want_tied].all())
            and int(flat[tied].sum()) == k - n_above
        )
        out["inputs"][label] = {
            "n": n,
            "k": k,
            "tied_at_threshold": int(tied.numel()),
            "threshold": float(ref),
            "median_s": {nm: statistics.median(ts) for nm, ts in times.items()},
            "runs_s": times,
            "exact": exact,
            "abs_pass_median_s": statistics.median(abs_times),
            "topk_mask_median_s": statistics.median(mask_times),
            "topk_mask_exact": mask_ok,
        }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=5632)
    p.add_argument("--cols", type=int, default=2048)
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None, help="write the results here (default: stdout)")
    a = p.parse_args(argv)
    res = run(a.rows, a.cols, a.density, a.repeats)
    text = json.dumps(res, indent=2)
    if a.json:
        Path(a.json).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
