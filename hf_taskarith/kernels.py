"""Fused CPU kernels (numba) for the hot merge paths: task arithmetic, TIES and DARE.

Why: on CPU every torch op is one pass over memory. The reference implementations in
:mod:`hf_taskarith.methods` build a (T, n) fp32 stack of τ, trim it into a second one and run
the sign election as a chain of ~20 elementwise ops, so a TIES merge of a 1B model makes a few
hundred passes over gigabytes. These kernels read the bf16/fp32 inputs directly (τ is never
stored), split each tensor into ranges for a thread pool, and give **the same bits** as the torch
reference on CPU
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
``HF_TASKARITH_FUSED=0`` turns them off. The kernels are serial numba functions over element
ranges that release the GIL; one thread pool (``torch.get_num_threads()`` threads) runs the ranges
of every tensor in flight, so the engine's read-ahead workers never oversubscribe the cores.
"""

from __future__ import annotations

import logging
import math
import os
import sys
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

CHUNK = 1 << 16  # elements per inner block (and per tie-count cell)
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
    return max(1, torch.get_num_threads())


if nb is not None:
    _GOLDEN = np.uint64(0x9E3779B97F4A7C15)
    _MIX1 = np.uint64(0xBF58476D1CE4E5B9)
    _MIX2 = np.uint64(0x94D049BB133111EB)
    _ABS = np.uint32(0x7FFFFFFF)
    _INF_BITS = np.uint32(0x7F800000)

    def _bitcast(src, dst):
        """An intrinsic reinterpreting the bits of a ``src`` scalar as a ``dst`` one."""

        @intrinsic
        def cast(typingctx, x):
            def codegen(context, builder, signature, args):
                return builder.bitcast(args[0], context.get_value_type(dst))

            return dst(src), codegen

        return cast

    _bits_to_f32 = _bitcast(types.uint32, types.float32)
    _f32_to_bits = _bitcast(types.float32, types.uint32)

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

    @nb.njit(inline="always")
    def _sign(x):
        """torch.sign: ±1, and 0 for ±0."""
        return np.float32(1.0) if x > 0 else (np.float32(-1.0) if x < 0 else np.float32(0.0) * x)

    # Selection passes work on one task at a time over elements [lo, hi), without the GIL; _run
    # spreads the ranges of one tensor over a shared thread pool.

    @nb.njit(nogil=True, cache=True, error_model="numpy")
    def _hist_high(b, f, hist, lo, hi):
        """Counts of |τ|'s 16 high bits into hist (slot 65536 counts NaNs)."""
        bs, fs = b[lo:hi], f[lo:hi]
        for j in range(hi - lo):
            a = _f32_to_bits(_delta(_load(fs[j]), _load(bs[j]))) & _ABS
            if a > _INF_BITS:
                hist[65536] += 1
            else:
                hist[a >> np.uint32(16)] += 1

    @nb.njit(nogil=True, cache=True, error_model="numpy")
    def _hist_low(b, f, bucket, hist, lo, hi):
        """Counts of |τ|'s 16 low bits among the entries whose high bits are ``bucket``."""
        bs, fs = b[lo:hi], f[lo:hi]
        want = np.uint32(bucket)
        for j in range(hi - lo):
            a = _f32_to_bits(_delta(_load(fs[j]), _load(bs[j]))) & _ABS
            if (a >> np.uint32(16)) == want:
                hist[a & np.uint32(0xFFFF)] += 1

    @nb.njit(nogil=True, cache=True, error_model="numpy")
    def _count_equal(b, f, v, counts, lo, hi):
        """counts[c] = how many |τ| bit patterns equal v in chunk c (chunks of CHUNK elements)."""
        target = np.uint32(v)
        for c0 in range(lo, hi, CHUNK):
            c1 = min(hi, c0 + CHUNK)
            bs, fs = b[c0:c1], f[c0:c1]
            k = 0
            for j in range(c1 - c0):
                a = _f32_to_bits(_delta(_load(fs[j]), _load(bs[j]))) & _ABS
                k += 1 if a == target else 0
            counts[c0 // CHUNK] = k

    @nb.njit(nogil=True, cache=True, error_model="numpy")
    def _nth_equal(b, f, v, lo, hi, r):
        """1 + the index of the r-th (1-based) entry in [lo, hi) whose |τ| bit pattern is v."""
        target = np.uint32(v)
        for j in range(lo, hi):
            a = _f32_to_bits(_delta(_load(f[j]), _load(b[j]))) & _ABS
            if a == target:
                r -= 1
                if r == 0:
                    return j + 1
        return hi


# ------------------------------------------------------------------------------------------------
# Per-element merge kernels, generated for each number of tasks T
# ------------------------------------------------------------------------------------------------
# A loop over a tuple of T arrays inside the element loop does not vectorise (numba indexes the
# tuple through a switch; 13× slower measured), so the merge kernels are written out for each T:
# every τ_i is a scalar in registers and the loop body is branch-free. The source goes to a file in
# the cache folder so numba can cache the compiled code like any module's.


def _lines(template: str, t: int) -> str:
    """Repeat each line holding ``{i}`` once per task (i = 0..T−1; ``{j}``: 1..T−1); ``{sum:EXPR}``
    becomes the left fold ((0 + EXPR₀) + EXPR₁) + ... with ``@`` the task index."""
    out = []
    for line in template.splitlines():
        if "{sum:" in line:
            head, rest = line.split("{sum:", 1)
            expr, tail = rest.split("}", 1)
            acc = "np.float32(0.0)"
            for i in range(t):
                acc = f"({acc} + {expr.replace('@', str(i))})"
            out.append(head + acc + tail)
        elif "{i}" in line:
            out.extend(line.replace("{i}", str(i)) for i in range(t))
        elif "{j}" in line:  # tasks 1..T−1 (after an explicit first term)
            out.extend(line.replace("{j}", str(i)) for i in range(1, t))
        else:
            out.append(line)
    return "\n".join(out)


_TEMPLATE = """
import numpy as np
import numba as nb
from hf_taskarith.kernels import _ABS, _delta, _f32_to_bits, _fma, _load, _put, _sign, _u24

_JIT = dict(nogil=True, cache=True, error_model="numpy")


@nb.njit(**_JIT)
def fold(b, FS, base_coef, scale_base, coefs, out, lo, hi):
    c{i} = coefs[{i}]
    bs, os = b[lo:hi], out[lo:hi]
    g{i} = f{i}[lo:hi]
    for j in range(hi - lo):
        acc = _load(bs[j])
        if scale_base:
            acc = acc * base_coef
        acc = _fma(_load(g{i}[j]), c{i}, acc)
        _put(os, j, acc)


@nb.njit(inline="always")
def _combine(base, X, w, consensus, weighted, frequency, normalize, norm_total, lam):
    w{i} = w[{i}]
    if consensus:
        if weighted:
            x{i} = x{i} * w{i}
        if frequency:
            score = {sum:_sign(x@)}
        else:
            score = {sum:x@}
        pos = score >= 0
        a{i} = (x{i} > 0) if pos else (x{i} < 0)
        num = np.float32(0.0)
        den = np.float32(0.0)
        if weighted:
            num = num + (x{i} if a{i} else np.float32(0.0))
            den = _fma(np.float32(1.0) if a{i} else np.float32(0.0), w{i}, den)
            if normalize:
                num = num / (np.float32(1.0) if abs(den) < 1e-8 else den)
        else:
            num = _fma(x{i} if a{i} else np.float32(0.0), w{i}, num)
            den = den + (np.float32(1.0) if a{i} else np.float32(0.0))
            if normalize:
                num = num / max(den, np.float32(1.0))
    else:
        num = x0 * w0
        num = _fma(x{j}, w{j}, num)
        if normalize:
            num = num / norm_total
    if lam != 1.0:
        num = num * lam
    return base + num


@nb.njit(**_JIT)
def ties(b, FS, vbits, cuts, use_thr, thr, w, weighted, frequency, normalize, lam, out, lo, hi):
    v{i} = np.uint32(vbits[{i}])
    k{i} = cuts[{i}]
    t{i} = thr[{i}]
    bs, os = b[lo:hi], out[lo:hi]
    g{i} = f{i}[lo:hi]
    for j in range(hi - lo):
        base = _load(bs[j])
        d{i} = _delta(_load(g{i}[j]), base)
        a{i} = _f32_to_bits(d{i}) & _ABS
        keep{i} = (abs(d{i}) >= t{i}) if use_thr else ((a{i} > v{i}) | ((a{i} == v{i}) & (lo + j < k{i})))
        x{i} = d{i} if keep{i} else np.float32(0.0) * d{i}
        _put(os, j, _combine(base, X, w, True, weighted, frequency, normalize, np.float32(1.0), lam))


@nb.njit(**_JIT)
def dare(b, FS, keys, cut24, dens, mode, rescale, consensus, w, weighted, frequency, normalize, norm_total, lam, out, lo, hi):
    key{i} = keys[{i}]
    c{i} = cut24[{i}]
    p{i} = dens[{i}]
    m{i} = mode[{i}]
    bs, os = b[lo:hi], out[lo:hi]
    g{i} = f{i}[lo:hi]
    for j in range(hi - lo):
        base = _load(bs[j])
        d{i} = _delta(_load(g{i}[j]), base)
        x{i} = d{i} if _u24(key{i}, lo + j) < c{i} else np.float32(0.0) * d{i}
        x{i} = (x{i} / p{i} if rescale else x{i}) if m{i} == 0 else (d{i} if m{i} == 1 else np.float32(0.0))
        _put(os, j, _combine(base, X, w, consensus, weighted, frequency, normalize, norm_total, lam))
"""

_GENERATED: dict = {}
_GEN_LOCK = threading.Lock()


def _cache_dir() -> "os.PathLike":
    from pathlib import Path

    root = os.environ.get("HF_TASKARITH_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "hf_taskarith", "kernels"
    )
    path = Path(root)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError:  # no writable cache: a private folder for this process (compiles again next time)
        import tempfile

        path = Path(tempfile.mkdtemp(prefix="hf_taskarith-kernels-"))
    return path


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError:
        return ""


def _kernels_for(t: int):
    """The generated module of merge kernels for T tasks (written and imported once)."""
    with _GEN_LOCK:
        if t in _GENERATED:
            return _GENERATED[t]
        import hashlib
        import importlib.util

        source = _lines(_TEMPLATE, t)
        source = source.replace("FS", ", ".join(f"f{i}" for i in range(t)))
        source = source.replace("X,", ", ".join(f"x{i}" for i in range(t)) + ",")
        digest = hashlib.sha256((source + nb.__version__).encode()).hexdigest()[:16]
        name = f"hf_taskarith_fused_t{t}_{digest}"
        path = os.path.join(_cache_dir(), name + ".py")
        # Only ever import a file that holds exactly this source (never whatever else lies there).
        if _read(path) != source:
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(source)
            os.replace(tmp, path)  # atomic: concurrent processes see a whole file or none
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # numba's cache finds the module's globals by name
        spec.loader.exec_module(module)
        _GENERATED[t] = module
        return module


_POOL = None
_POOL_LOCK = threading.Lock()
_RANGE = 1 << 20  # elements per work item: small enough to balance the threads


def _pool():
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers != _threads():
            from concurrent.futures import ThreadPoolExecutor

            _POOL = ThreadPoolExecutor(max_workers=_threads(), thread_name_prefix="hf_taskarith-kernel")
        return _POOL


def _run(fn, n: int, *args, windows: Sequence = ()) -> None:
    """``fn(*args, lo, hi)`` over chunk-aligned ranges of _RANGE elements covering [0, n), handed
    to the kernel pool's threads as they free up. ``windows``: ``(MappedWindow, itemsize)`` of
    mapped inputs, whose pages are filled for each range before it runs and dropped after."""
    _wait([(_in_windows, (windows, fn, args, lo, min(n, lo + _RANGE))) for lo in range(0, n, _RANGE)])


def _hist(fn, n: int, size: int, *args, windows: Sequence = ()) -> np.ndarray:
    """Sum over threads of ``fn(*args, hist_p, lo, hi)``: one near-equal part and histogram per
    thread, walked in _RANGE steps (so mapped inputs are resident one range at a time)."""
    per_thread = -(-n // _threads())  # ceil
    step = max(CHUNK, -(-per_thread // CHUNK) * CHUNK)
    parts = [(lo, min(n, lo + step)) for lo in range(0, n, step)]
    hists = np.zeros((max(len(parts), 1), size), dtype=np.int64)

    def part(p: int, lo: int, hi: int) -> None:
        for s in range(lo, hi, _RANGE):
            _in_windows(windows, fn, (*args, hists[p]), s, min(hi, s + _RANGE))

    _wait([(part, (p, lo, hi)) for p, (lo, hi) in enumerate(parts)])
    return hists.sum(axis=0)


def _in_windows(windows: Sequence, fn, args: tuple, lo: int, hi: int) -> None:
    for window, size in windows:
        window.populate(lo * size, hi * size)
    try:
        fn(*args, lo, hi)
    finally:
        for window, size in windows:
            window.release(lo * size, hi * size)


def _windows(*tensors: torch.Tensor) -> List[Tuple[object, int]]:
    """``(MappedWindow, itemsize)`` of the inputs that are mapped views (see checkpoint.mapped_reads)."""
    from .checkpoint import mapped_window

    found = [(mapped_window(t), t.element_size()) for t in tensors]
    return [(w, size) for w, size in found if w is not None]


def _wait(calls) -> None:
    if len(calls) <= 1:
        for fn, args in calls:
            fn(*args)
        return
    for future in [_pool().submit(fn, *args) for fn, args in calls]:
        future.result()


# ------------------------------------------------------------------------------------------------
# Python entry points: torch tensors in, an fp32 (or bf16) torch tensor out
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
    _run(
        _kernels_for(len(fs)).fold, b.shape[0], b, *fs, np.float32(base_coef), base_coef != 1.0, coefs, view,
        windows=_windows(base, *[t for _, t in terms]),
    )
    return out


def _select(b: np.ndarray, f: np.ndarray, k: int, windows: Sequence = ()) -> Optional[Tuple[int, int]]:
    """Exact top-k of |τ| = |f − b| by radix select on the fp32 bit pattern.

    Returns ``(v, cut)``: keep entries with bits(|τ|) > v, and those equal to v at indices < cut
    (the lowest-index ties, as :func:`hf_taskarith.methods.topk_mask`); ``None`` if τ has NaNs.
    """
    n = b.shape[0]
    if k <= 0:
        return 0x80000000, 0  # above every |τ| bit pattern: nothing kept
    if k >= n:
        return 0, n  # everything is >= 0: all kept
    high = _hist(_hist_high, n, 65537, b, f, windows=windows)
    if high[65536]:
        return None
    from_top = np.cumsum(high[:65536][::-1])
    pos = int(np.searchsorted(from_top, k))
    bucket = 65535 - pos
    above = int(from_top[pos - 1]) if pos > 0 else 0
    low = _hist(_hist_low, n, 65536, b, f, bucket, windows=windows)
    from_top = np.cumsum(low[::-1])
    pos = int(np.searchsorted(from_top, k - above))
    v = (bucket << 16) | (65535 - pos)
    need = k - above - (int(from_top[pos - 1]) if pos > 0 else 0)  # ties at v to keep
    if need == int(low[65535 - pos]):
        return v, n  # all of them
    counts = np.zeros(-(-n // CHUNK), dtype=np.int64)
    _run(_count_equal, n, b, f, v, counts, windows=windows)
    before = np.cumsum(counts) - counts
    c = int(np.searchsorted(before + counts, need))  # the chunk holding the need-th tie
    return v, int(_nth_equal(b, f, v, c * CHUNK, min(n, (c + 1) * CHUNK), need - int(before[c])))


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
    vbits = np.zeros(t, dtype=np.int64)
    cuts = np.zeros(t, dtype=np.int64)
    thr = np.zeros(t, dtype=np.float32)
    if thresholds is not None:
        thr[:] = np.asarray(thresholds, dtype=np.float32)
    else:
        for i, (f, k) in enumerate(zip(fs, ks)):
            selected = _select(b, f, int(k), _windows(base, fts[i]))
            if selected is None:
                return None
            vbits[i], cuts[i] = selected
    out, view = _output(base.shape, out_dtype)
    _run(
        _kernels_for(t).ties, b.shape[0], b, *fs, vbits, cuts, thresholds is not None, thr,
        np.asarray(weights, dtype=np.float32), bool(weighted_election), majority_sign_method == "frequency",
        bool(normalize), np.float32(lambda_), view, windows=_windows(base, *fts),
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
    _run(
        _kernels_for(len(fs)).dare, b.shape[0], b, *fs, np.asarray([k % (1 << 64) for k in keys], dtype=np.uint64),
        cut, np.asarray(densities, dtype=np.float32), mode, bool(rescale), bool(consensus),
        np.asarray(weights, dtype=np.float32), bool(weighted_election), majority_sign_method == "frequency",
        bool(normalize), norm_total, np.float32(lambda_), view, windows=_windows(base, *fts),
    )
    return out


__all__: List[str] = ["available", "kernel_array", "fold", "ties", "dare", "CHUNK"]
