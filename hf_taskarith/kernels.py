"""Fused CPU kernels (numba) for the hot merge paths: task arithmetic, TIES and DARE.

Why: on CPU every torch op is one pass over memory. The reference implementations in
:mod:`hf_taskarith.methods` build a (T, n) fp32 stack of τ, trim it into a second one and run
the sign election as a chain of ~20 elementwise ops, so a TIES merge of a 1B model makes a few
hundred passes over gigabytes. These kernels read the bf16/fp32 inputs directly (τ is never
stored), parallelise over chunks, and give **the same bits** as the torch reference on CPU
(``tests/test_kernels.py`` checks bitwise, including the order of fp32 additions and the fused
multiply-adds torch uses for ``add_(x, alpha=w)``).

- TIES's exact top-k threshold is a two-pass radix select on the fp32 bit pattern of |τ|
  (16 high bits, then 16 low bits inside the one bucket that holds the k-th largest), with ties
  at the threshold kept lowest index first, as :func:`hf_taskarith.methods.topk_mask` does.
- DARE's masks come from a counter-based generator (splitmix64 of seed, tensor, task and element
  index; :func:`hf_taskarith.methods.counter_uniform24` is its torch twin), so any chunking, thread
  count, device or process split draws the same mask.

The engine calls these only on CPU, for inputs that are all bf16 or all fp32, and falls back to the
torch path otherwise (and for NaN deltas in a top-k, whose order the radix select does not model).
``HF_TASKARITH_FUSED=0`` turns them off. Kernel calls are serialised by a lock: each one already
uses every core, and numba's default thread pool must not be entered from two threads at once.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

logger = logging.getLogger(__name__)

try:  # numba is a dependency, but a broken install must not break merging: fall back to torch
    import numba as nb
    from numba import types
    from numba.extending import intrinsic, overload

    _IMPORT_ERROR: Optional[BaseException] = None
except Exception as err:  # pragma: no cover - exercised only without numba
    nb = None
    _IMPORT_ERROR = err

CHUNK = 1 << 16  # elements per parallel work item (and per tie-count cell)
_LOCK = threading.Lock()
_WARNED = False


def available() -> bool:
    """Whether the fused kernels can run (numba imports and ``HF_TASKARITH_FUSED`` is not ``0``)."""
    global _WARNED
    if os.environ.get("HF_TASKARITH_FUSED", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if nb is None:
        if not _WARNED:
            logger.warning("numba is not importable (%s): merges use the slower torch path", _IMPORT_ERROR)
            _WARNED = True
        return False
    return True


def kernel_array(t: torch.Tensor) -> Optional[np.ndarray]:
    """A flat numpy view of a CPU bf16 (as uint16 bits) or fp32 tensor; ``None`` for other dtypes."""
    if t.device.type != "cpu":
        return None
    t = t.reshape(-1)
    if not t.is_contiguous():
        t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype == torch.float32:
        return t.numpy()
    return None


def _threads() -> int:
    return max(1, min(torch.get_num_threads(), nb.config.NUMBA_NUM_THREADS))


if nb is not None:
    _GOLDEN = np.uint64(0x9E3779B97F4A7C15)
    _MIX1 = np.uint64(0xBF58476D1CE4E5B9)
    _MIX2 = np.uint64(0x94D049BB133111EB)
    _ABS = np.uint32(0x7FFFFFFF)
    _INF_BITS = np.uint32(0x7F800000)

    @intrinsic
    def _bits_to_f32(typingctx, x):
        sig = types.float32(types.uint32)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(types.float32))

        return sig, codegen

    @intrinsic
    def _f32_to_bits(typingctx, x):
        sig = types.uint32(types.float32)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(types.uint32))

        return sig, codegen

    @intrinsic
    def _fma(typingctx, a, b, c):
        """fp32 a·b + c with one rounding: what torch's vectorised ``add_(x, alpha=w)`` computes."""
        sig = types.float32(types.float32, types.float32, types.float32)

        def codegen(context, builder, signature, args):
            return builder.fma(*args)

        return sig, codegen

    def _load(x):  # pragma: no cover - replaced by the overload in jitted code
        raise NotImplementedError

    @overload(_load, inline="always")
    def _load_impl(x):
        if x == types.uint16:  # bf16 bits: the high half of an fp32

            def impl(x):
                return _bits_to_f32(np.uint32(x) << np.uint32(16))

            return impl
        if x == types.float32:
            return lambda x: x
        return None

    def _put(out, j, v):  # pragma: no cover - replaced by the overload in jitted code
        raise NotImplementedError

    @overload(_put, inline="always")
    def _put_impl(out, j, v):
        if out.dtype == types.uint16:  # bf16 output: round to nearest even, as torch's .to(bfloat16)

            def impl(out, j, v):
                u = _f32_to_bits(v)
                if (u & _ABS) > _INF_BITS:
                    out[j] = np.uint16(0x7FC0)
                else:
                    out[j] = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))

            return impl
        if out.dtype == types.float32:

            def impl(out, j, v):
                out[j] = v

            return impl
        return None

    @nb.njit(inline="always")
    def _delta(f, b):
        """τ = θ_i − θ0 as the torch path forms it: (0 + θ_i) − θ0 (same zero signs)."""
        return (np.float32(0.0) + f) - b

    @nb.njit(inline="always")
    def _u24(key, j):
        """24 uniform bits for element j: splitmix64's finaliser of key + (j+1)·golden."""
        z = key + np.uint64(j + 1) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z = z ^ (z >> np.uint64(31))
        return np.int64(z >> np.uint64(40))

    @nb.njit(parallel=True, nogil=True, cache=True)
    def _fold_kernel(base, fts, base_coef, scale_base, coefs, out):
        n = out.shape[0]
        nch = (n + CHUNK - 1) // CHUNK
        for c in nb.prange(nch):
            lo = c * CHUNK
            hi = min(n, lo + CHUNK)
            acc = np.empty(hi - lo, np.float32)
            if scale_base:
                for j in range(lo, hi):
                    acc[j - lo] = _load(base[j]) * base_coef
            else:
                for j in range(lo, hi):
                    acc[j - lo] = _load(base[j])
            for i in range(len(fts)):
                f = fts[i]
                ci = coefs[i]
                for j in range(lo, hi):
                    acc[j - lo] = _fma(_load(f[j]), ci, acc[j - lo])
            for j in range(lo, hi):
                _put(out, j, acc[j - lo])
        return out

    @nb.njit(parallel=True, nogil=True, cache=True)
    def _hist_high(base, fts, nparts):
        """Per task: counts of |τ|'s 16 high bits (slot 65536 counts NaNs)."""
        n = base.shape[0]
        t = len(fts)
        hist = np.zeros((nparts, t, 65537), np.int64)
        step = (n + nparts - 1) // nparts
        for p in nb.prange(nparts):
            lo = p * step
            hi = min(n, lo + step)
            for i in range(t):
                f = fts[i]
                for j in range(lo, hi):
                    a = _f32_to_bits(_delta(_load(f[j]), _load(base[j]))) & _ABS
                    if a > _INF_BITS:
                        hist[p, i, 65536] += 1
                    else:
                        hist[p, i, a >> np.uint32(16)] += 1
        return hist.sum(axis=0)

    @nb.njit(parallel=True, nogil=True, cache=True)
    def _hist_low(base, fts, buckets, nparts):
        """Per task: counts of |τ|'s 16 low bits among entries in that task's high bucket."""
        n = base.shape[0]
        t = len(fts)
        hist = np.zeros((nparts, t, 65536), np.int64)
        step = (n + nparts - 1) // nparts
        for p in nb.prange(nparts):
            lo = p * step
            hi = min(n, lo + step)
            for i in range(t):
                f = fts[i]
                bucket = np.uint32(buckets[i])
                if buckets[i] < 0:
                    continue
                for j in range(lo, hi):
                    a = _f32_to_bits(_delta(_load(f[j]), _load(base[j]))) & _ABS
                    if (a >> np.uint32(16)) == bucket:
                        hist[p, i, a & np.uint32(0xFFFF)] += 1
        return hist.sum(axis=0)

    @nb.njit(parallel=True, nogil=True, cache=True)
    def _tie_counts(base, fts, vbits, active):
        """Per chunk and task: how many |τ| equal that task's threshold (tasks with active[i])."""
        n = base.shape[0]
        t = len(fts)
        nch = (n + CHUNK - 1) // CHUNK
        counts = np.zeros((nch, t), np.int64)
        for c in nb.prange(nch):
            lo = c * CHUNK
            hi = min(n, lo + CHUNK)
            for i in range(t):
                if not active[i]:
                    continue
                f = fts[i]
                v = np.uint32(vbits[i])
                k = 0
                for j in range(lo, hi):
                    a = _f32_to_bits(_delta(_load(f[j]), _load(base[j]))) & _ABS
                    if a == v:
                        k += 1
                counts[c, i] = k
        return counts

    @nb.njit(inline="always")
    def _combine_chunk(xs, m, bb, w, consensus, weighted, frequency, normalize, norm_total, lam, out, lo):
        """TIES election + disjoint merge (``consensus``) or a weighted sum of the chunk's τ̂ rows,
        then λ, added to the base: the operation order of methods._elect_and_merge / _combine."""
        t = xs.shape[0]
        num = np.zeros(m, np.float32)
        if consensus:
            if weighted:
                for i in range(t):
                    wi = w[i]
                    for jj in range(m):
                        xs[i, jj] = xs[i, jj] * wi
            score = np.zeros(m, np.float32)
            for i in range(t):
                for jj in range(m):
                    x = xs[i, jj]
                    if frequency:
                        s = np.float32(1.0) if x > 0 else (np.float32(-1.0) if x < 0 else np.float32(0.0) * x)
                        score[jj] += s
                    else:
                        score[jj] += x
            den = np.zeros(m, np.float32)
            for i in range(t):
                wi = w[i]
                for jj in range(m):
                    x = xs[i, jj]
                    agree = x > 0 if score[jj] >= 0 else x < 0
                    kept = x if agree else np.float32(0.0)
                    flag = np.float32(1.0) if agree else np.float32(0.0)
                    if weighted:
                        num[jj] += kept
                        den[jj] = _fma(flag, wi, den[jj])
                    else:
                        num[jj] = _fma(kept, wi, num[jj])
                        den[jj] += flag
            if normalize:
                for jj in range(m):
                    d = den[jj]
                    if weighted:
                        if abs(d) < 1e-8:
                            d = np.float32(1.0)
                    elif d < 1.0:
                        d = np.float32(1.0)
                    num[jj] = num[jj] / d
        else:
            w0 = w[0]
            for jj in range(m):
                num[jj] = xs[0, jj] * w0
            for i in range(1, t):
                wi = w[i]
                for jj in range(m):
                    num[jj] = _fma(xs[i, jj], wi, num[jj])
            if normalize:
                for jj in range(m):
                    num[jj] = num[jj] / norm_total
        for jj in range(m):
            r = num[jj]
            if lam != 1.0:
                r = r * lam
            _put(out, lo + jj, bb[jj] + r)

    @nb.njit(parallel=True, nogil=True, cache=True)
    def _ties_kernel(base, fts, vbits, quota, counts, use_thr, thr, w, weighted, frequency, normalize, lam, out):
        """TIES on one tensor. Exact top-k: keep |τ_i| > v_i, and of the entries equal to v_i the
        first quota[c, i] in chunk c (all of them where quota == counts). ``use_thr``: keep
        |τ_i| >= thr[i] (global top-k thresholds)."""
        n = base.shape[0]
        t = len(fts)
        nch = (n + CHUNK - 1) // CHUNK
        for c in nb.prange(nch):
            lo = c * CHUNK
            hi = min(n, lo + CHUNK)
            m = hi - lo
            bb = np.empty(m, np.float32)
            for jj in range(m):
                bb[jj] = _load(base[lo + jj])
            xs = np.empty((t, m), np.float32)
            for i in range(t):
                f = fts[i]
                if use_thr:
                    ti = thr[i]
                    for jj in range(m):
                        d = _delta(_load(f[lo + jj]), bb[jj])
                        xs[i, jj] = d if abs(d) >= ti else np.float32(0.0) * d
                    continue
                v = np.uint32(vbits[i])
                q = quota[c, i]
                if q == counts[c, i]:
                    for jj in range(m):
                        d = _delta(_load(f[lo + jj]), bb[jj])
                        xs[i, jj] = d if (_f32_to_bits(d) & _ABS) >= v else np.float32(0.0) * d
                else:
                    for jj in range(m):
                        d = _delta(_load(f[lo + jj]), bb[jj])
                        xs[i, jj] = d if (_f32_to_bits(d) & _ABS) > v else np.float32(0.0) * d
                    jj = 0
                    while q > 0 and jj < m:
                        d = _delta(_load(f[lo + jj]), bb[jj])
                        if (_f32_to_bits(d) & _ABS) == v:
                            xs[i, jj] = d
                            q -= 1
                        jj += 1
            _combine_chunk(xs, m, bb, w, True, weighted, frequency, normalize, np.float32(1.0), lam, out, lo)
        return out

    @nb.njit(parallel=True, nogil=True, cache=True)
    def _dare_kernel(
        base, fts, keys, thr24, dens, mode, rescale, consensus, w, weighted, frequency, normalize, norm_total, lam, out
    ):
        """DARE on one tensor: mode[i] 0 = drop with P(keep) = thr24[i]/2^24 (then ÷ dens[i] if
        ``rescale``), 1 = keep all (density >= 1), 2 = drop all (density <= 0)."""
        n = base.shape[0]
        t = len(fts)
        nch = (n + CHUNK - 1) // CHUNK
        for c in nb.prange(nch):
            lo = c * CHUNK
            hi = min(n, lo + CHUNK)
            m = hi - lo
            bb = np.empty(m, np.float32)
            for jj in range(m):
                bb[jj] = _load(base[lo + jj])
            xs = np.empty((t, m), np.float32)
            for i in range(t):
                f = fts[i]
                if mode[i] == 1:
                    for jj in range(m):
                        xs[i, jj] = _delta(_load(f[lo + jj]), bb[jj])
                    continue
                if mode[i] == 2:
                    for jj in range(m):
                        xs[i, jj] = np.float32(0.0)
                    continue
                key = keys[i]
                cut = thr24[i]
                di = dens[i]
                for jj in range(m):
                    d = _delta(_load(f[lo + jj]), bb[jj])
                    x = d if _u24(key, lo + jj) < cut else np.float32(0.0) * d
                    if rescale:
                        x = x / di
                    xs[i, jj] = x
            _combine_chunk(xs, m, bb, w, consensus, weighted, frequency, normalize, norm_total, lam, out, lo)
        return out


# ------------------------------------------------------------------------------------------------
# Python entry points: torch tensors in, an fp32 torch tensor out
# ------------------------------------------------------------------------------------------------


def _output(shape: torch.Size, out_dtype: Optional[torch.dtype]) -> Tuple[torch.Tensor, np.ndarray]:
    """The result tensor (bf16 when asked for, else fp32) and the kernel's flat view of it."""
    if out_dtype == torch.bfloat16:
        out = torch.empty(shape, dtype=torch.bfloat16)
        return out, out.view(-1).view(torch.int16).numpy().view(np.uint16)
    out = torch.empty(shape, dtype=torch.float32)
    return out, out.view(-1).numpy()


def _arrays(base: torch.Tensor, fts: Sequence[torch.Tensor]) -> Optional[Tuple[np.ndarray, Tuple[np.ndarray, ...]]]:
    """Kernel views of the base and the finetunes, or ``None`` when the kernels do not take them."""
    if not fts:
        return None
    b = kernel_array(base)
    fs = [kernel_array(f) for f in fts]
    if b is None or any(f is None for f in fs) or len({f.dtype for f in fs}) != 1:
        return None
    if any(f.shape != b.shape for f in fs):
        return None
    return b, tuple(fs)


def fold(
    base: torch.Tensor,
    base_coef: float,
    terms: Sequence[Tuple[float, torch.Tensor]],
    out_dtype: Optional[torch.dtype] = None,
) -> Optional[torch.Tensor]:
    """``base_coef·θ0 + Σ c_i·θ_i`` in fp32, as :func:`hf_taskarith.merged.fold_linear` computes it.

    Args:
        out_dtype: ``torch.bfloat16`` to get the result rounded to bf16 in the same pass (the bits
            of ``.to(torch.bfloat16)``); anything else gives fp32.

    Returns:
        The result shaped like ``base``, or ``None`` if the inputs are not kernel dtypes.
    """
    if not terms:  # nothing to fuse
        out = base.to(torch.float32, copy=True)
        return out.mul_(base_coef) if base_coef != 1.0 else out
    arrays = _arrays(base, [t for _, t in terms])
    if arrays is None:
        return None
    b, fs = arrays
    out, view = _output(base.shape, out_dtype)
    coefs = np.array([c for c, _ in terms], dtype=np.float32)
    with _LOCK:
        nb.set_num_threads(_threads())
        _fold_kernel(b, fs, np.float32(base_coef), base_coef != 1.0, coefs, view)
    return out


def _select(b: np.ndarray, fs: Tuple[np.ndarray, ...], ks: Sequence[int]) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Exact k-th largest |τ_i| bit patterns by radix select; with the quota arrays for ties.

    Returns ``(vbits, quota, counts)`` or ``None`` when a τ_i has NaNs.
    """
    n, t = b.shape[0], len(fs)
    nparts = _threads()
    high = _hist_high(b, fs, nparts)
    if high[:, 65536].any():
        return None
    buckets = np.full(t, -1, dtype=np.int64)
    above = np.zeros(t, dtype=np.int64)
    vbits = np.zeros(t, dtype=np.int64)
    for i, k in enumerate(ks):
        if k <= 0:
            vbits[i] = 0x80000000  # above every |τ| bit pattern: nothing kept
        elif k >= n:
            vbits[i] = 0  # every entry is >= 0: all kept
        else:
            from_top = np.cumsum(high[i, :65536][::-1])
            pos = int(np.searchsorted(from_top, k))
            buckets[i] = 65535 - pos
            above[i] = from_top[pos - 1] if pos > 0 else 0
    need = np.zeros(t, dtype=np.int64)
    ties = np.zeros(t, dtype=np.int64)
    if (buckets >= 0).any():
        low = _hist_low(b, fs, buckets, nparts)
        for i in range(t):
            if buckets[i] < 0:
                continue
            from_top = np.cumsum(low[i][::-1])
            pos = int(np.searchsorted(from_top, ks[i] - above[i]))
            low_bits = 65535 - pos
            vbits[i] = (int(buckets[i]) << 16) | low_bits
            n_gt = above[i] + (from_top[pos - 1] if pos > 0 else 0)
            need[i], ties[i] = ks[i] - n_gt, low[i][low_bits]
    nch = (n + CHUNK - 1) // CHUNK
    partial = (buckets >= 0) & (need != ties)  # some but not all entries at the threshold are kept
    if partial.any():
        counts = _tie_counts(b, fs, vbits, partial)
        before = np.cumsum(counts, axis=0) - counts
        quota = np.where(partial[None, :], np.clip(need[None, :] - before, 0, counts), counts)
    else:
        counts = np.zeros((nch, t), dtype=np.int64)
        quota = counts
    return vbits, np.ascontiguousarray(quota), np.ascontiguousarray(counts)


def ties(
    base: torch.Tensor,
    fts: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    ks: Optional[Sequence[int]] = None,
    thresholds: Optional[Sequence[float]] = None,
    weighted_election: bool = False,
    majority_sign_method: str = "total",
    normalize: bool = True,
    lambda_: float = 1.0,
    out_dtype: Optional[torch.dtype] = None,
) -> Optional[torch.Tensor]:
    """θ0 + TIES(τ_1..τ_T) in fp32, the bits of ``base + methods.ties(stack of τ, ...)`` on CPU.

    Args:
        base: θ0 (bf16 or fp32, CPU).
        fts: θ_i, same shape, all bf16 or all fp32.
        weights: w_i.
        ks: Entries kept per task (exact top-k, ties lowest index first), or
        thresholds: keep |τ_i| >= thresholds[i] (global top-k).
        weighted_election, majority_sign_method, normalize, lambda_: As in :func:`methods.ties`.
        out_dtype: As in :func:`fold`.

    Returns:
        The merged tensor (shape of ``base``), or ``None`` when the kernel does not apply
        (other dtypes, NaN in a τ_i) and the caller should use the torch path.
    """
    arrays = _arrays(base, fts)
    if arrays is None:
        return None
    b, fs = arrays
    t = len(fs)
    with _LOCK:
        nb.set_num_threads(_threads())
        if thresholds is not None:
            vbits = np.zeros(t, dtype=np.int64)
            quota = counts = np.zeros((1, t), dtype=np.int64)
            thr = np.asarray(thresholds, dtype=np.float32)
        else:
            selected = _select(b, fs, list(ks))
            if selected is None:
                return None
            vbits, quota, counts = selected
            thr = np.zeros(t, dtype=np.float32)
        out, view = _output(base.shape, out_dtype)
        _ties_kernel(
            b, fs, vbits, quota, counts, thresholds is not None, thr, np.asarray(weights, dtype=np.float32),
            bool(weighted_election), majority_sign_method == "frequency", bool(normalize), np.float32(lambda_),
            view,
        )
    return out


def dare(
    base: torch.Tensor,
    fts: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    keys: Sequence[int],
    densities: Sequence[float],
    rescale: bool = True,
    consensus: bool = True,
    weighted_election: bool = False,
    majority_sign_method: str = "total",
    normalize: bool = True,
    lambda_: float = 1.0,
    out_dtype: Optional[torch.dtype] = None,
) -> Optional[torch.Tensor]:
    """θ0 + DARE(τ_1..τ_T) in fp32 with counter-based masks: the bits of ``base +
    methods.dare_ties(...)`` (``consensus``) or ``methods.dare_linear(...)`` given ``keys``.

    Args:
        keys: One 64-bit mask key per task (:func:`hf_taskarith.methods.dare_key`).
        densities: Keep probabilities (1 − p).
        rescale: Divide kept entries by the density ("inverse" rescaling; L1 is not fused).
        consensus: TIES election (``dare_ties``) instead of a weighted sum (``dare_linear``).
        out_dtype: As in :func:`fold`.

    Returns:
        The merged tensor, or ``None`` when the kernel does not take these inputs.
    """
    from .methods import keep_cut24

    arrays = _arrays(base, fts)
    if arrays is None:
        return None
    b, fs = arrays
    mode = np.array([1 if d >= 1.0 else 2 if d <= 0.0 else 0 for d in densities], dtype=np.int64)
    cut = np.array([keep_cut24(min(max(d, 0.0), 1.0)) for d in densities], dtype=np.int64)
    total = math.fsum(weights)
    norm_total = np.float32(total if abs(total) >= 1e-8 else 1.0)
    out, view = _output(base.shape, out_dtype)
    with _LOCK:
        nb.set_num_threads(_threads())
        _dare_kernel(
            b, fs, np.asarray([k % (1 << 64) for k in keys], dtype=np.uint64), cut,
            np.asarray(densities, dtype=np.float32), mode, bool(rescale), bool(consensus),
            np.asarray(weights, dtype=np.float32), bool(weighted_election), majority_sign_method == "frequency",
            bool(normalize), norm_total, np.float32(lambda_), view,
        )
    return out


__all__: List[str] = ["available", "kernel_array", "fold", "ties", "dare", "CHUNK"]
