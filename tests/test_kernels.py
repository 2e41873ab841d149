"""The fused CPU kernels give the same bits as the torch reference methods, and the engine uses them.

Expected values come from the torch implementations in ``hf_taskarith.methods`` (themselves checked
against hand-computed numbers and PEFT in test_methods.py), from a pure-Python splitmix64, and from
the same merge run with the kernels switched off (``HF_TASKARITH_FUSED=0``).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import yaml

from hf_taskarith import kernels as K
from hf_taskarith import methods as M
from hf_taskarith.engine import add_scaled_, scale_into_

pytestmark = pytest.mark.skipif(not K.available(), reason="numba kernels unavailable")

# More than one chunk, and not a whole number of them, so tie quotas cross chunk borders.
SHAPE = (3, K.CHUNK + 4321)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                                                                     b.view(torch.int16 if b.element_size() == 2 else torch.int32))


def checkpoint_like(dtype: torch.dtype, seed: int = 0, n_tasks: int = 3, quantise: bool = False):
    """A base and finetunes as stored tensors; ``quantise`` puts thousands of |τ| on one value."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(SHAPE, generator=g) * 0.02).to(dtype)
    fts = []
    for i in range(n_tasks):
        noise = torch.randn(SHAPE, generator=g) * 0.002
        if quantise:
            noise = (noise * 2000).round() / 2000
        fts.append((base.float() + noise).to(dtype))
    return base, fts


def torch_deltas(base: torch.Tensor, fts):
    """The (T, shape) fp32 stack exactly as MethodMerge._deltas builds it."""
    b = base.float()
    deltas = torch.zeros((len(fts), *b.shape))
    for i, f in enumerate(fts):
        add_scaled_(deltas[i], f, 1.0)
        add_scaled_(deltas[i], b, -1.0)
    return b, deltas


# ------------------------------------------------------------------------------------------ RNG


def _splitmix_u24(key: int, j: int) -> int:
    m = (1 << 64) - 1
    z = (key + (j + 1) * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return (z ^ (z >> 31)) >> 40


@pytest.mark.parametrize("key", [0, 1, 2**63 + 12345, 2**64 - 1])
def test_counter_generator_matches_pure_python_splitmix64(key):
    start, n = 70_000, 300
    got = M.counter_uniform24(key, start, n).tolist()
    assert got == [_splitmix_u24(key, start + j) for j in range(n)]


def test_counter_masks_keep_about_density_and_differ_by_task():
    base, fts = checkpoint_like(torch.float32, n_tasks=2)
    b, d = torch_deltas(base, fts)
    out = M.dare_linear(d, torch.tensor([1.0, 0.0]), b, density=0.3, rescale=False, key=99)
    kept = (out != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.01
    m0 = M._counter_mask(M.dare_key(99, 0), d[0].shape, 0.3, d.device)
    m1 = M._counter_mask(M.dare_key(99, 1), d[0].shape, 0.3, d.device)
    assert not torch.equal(m0, m1)
    # Blocked generation is the same stream as one block (the kernel draws chunk by chunk).
    n = d[0].numel()
    whole = M.counter_uniform24(M.dare_key(99, 0), 0, n)
    assert torch.equal(torch.cat([M.counter_uniform24(M.dare_key(99, 0), s, min(5000, n - s)) for s in range(0, n, 5000)]), whole)


# ------------------------------------------------------------------------------------------ TIES


TIES_CASES = list(
    itertools.product(
        [torch.bfloat16, torch.float32],
        [False, True],  # weighted election
        ["total", "frequency"],
        [[0.2, 0.2, 0.2], [0.05, 1.0, 0.5], [1e-7, 0.3, 0.999]],
        [True, False],  # normalize
    )
)


@pytest.mark.parametrize("dtype,weighted,msm,density,normalize", TIES_CASES)
def test_ties_kernel_is_bitwise_the_torch_method(dtype, weighted, msm, density, normalize):
    base, fts = checkpoint_like(dtype, seed=1, quantise=True)
    b, d = torch_deltas(base, fts)
    w = torch.tensor([0.5, 0.3, -0.2])
    kw = dict(weighted_election=weighted, majority_sign_method=msm, normalize=normalize, lambda_=0.7)
    want = b + M.ties(d, w, b, density=density, **kw)
    n = b.numel()
    ks = [n if x >= 1 else int(x * n) for x in density]
    got = K.ties(base, fts, w.tolist(), ks=ks, **kw)
    assert same_bits(got, want)
    got16 = K.ties(base, fts, w.tolist(), ks=ks, out_dtype=torch.bfloat16, **kw)
    assert same_bits(got16, want.to(torch.bfloat16))


def test_ties_kernel_keeps_exactly_k_with_ties_at_the_threshold_lowest_index_first():
    # Every |τ| is 1 or 2: the threshold is tied across chunks, and only the first tied entries stay.
    base = torch.zeros(SHAPE)
    tau = torch.ones(SHAPE)
    tau.view(-1)[::7] = 2.0
    tau.view(-1)[1::3] *= -1
    n = tau.numel()
    k = n // 2
    got = K.ties(base, [tau], [1.0], ks=[k])
    kept = got.view(-1) != 0
    assert int(kept.sum()) == k
    n_two = int((tau.view(-1) == 2).sum() + (tau.view(-1) == -2).sum())
    ones = (tau.view(-1).abs() == 1).nonzero().view(-1)
    want = torch.zeros(n, dtype=torch.bool)
    want[tau.view(-1).abs() == 2] = True
    want[ones[: k - n_two]] = True
    assert torch.equal(kept, want)
    assert torch.equal(got.view(-1)[kept], tau.view(-1)[kept])


def test_ties_kernel_global_thresholds_match_the_torch_method():
    base, fts = checkpoint_like(torch.bfloat16, seed=2)
    b, d = torch_deltas(base, fts)
    w = torch.tensor([1.0, 0.6, 0.3])
    thr = [float(d[i].abs().median()) for i in range(3)]
    want = b + M.ties(d, w, b, thresholds=thr, weighted_election=True)
    got = K.ties(base, fts, w.tolist(), thresholds=thr, weighted_election=True)
    assert same_bits(got, want)


def test_ties_kernel_declines_nan_deltas():
    base, fts = checkpoint_like(torch.float32, seed=3)
    fts[1] = fts[1].clone()
    fts[1].view(-1)[17] = float("nan")
    assert K.ties(base, fts, [1.0, 1.0, 1.0], ks=[100, 100, 100]) is None


# ------------------------------------------------------------------------------------------ DARE


@pytest.mark.parametrize(
    "dtype,consensus,rescale,normalize,weighted",
    [  # dare_linear (consensus False) has no election to weight
        c for c in itertools.product([torch.bfloat16, torch.float32], [True, False], [True, False], [True, False], [False, True])
        if c[1] or not c[4]
    ],
)
def test_dare_kernel_is_bitwise_the_torch_method(dtype, consensus, rescale, normalize, weighted):
    base, fts = checkpoint_like(dtype, seed=4)
    b, d = torch_deltas(base, fts)
    w = torch.tensor([0.5, -0.3, 0.9])
    dens = [0.2, 0.5, 1.0]
    key = 2024
    if consensus:
        want = b + M.dare_ties(d, w, b, density=dens, rescale=rescale, normalize=normalize, lambda_=1.3,
                               weighted_election=weighted, key=key)
    else:
        want = b + M.dare_linear(d, w, b, density=dens, rescale=rescale, normalize=normalize, lambda_=1.3, key=key)
    got = K.dare(base, fts, w.tolist(), keys=[M.dare_key(key, i) for i in range(3)], densities=dens, rescale=rescale,
                 consensus=consensus, normalize=normalize, lambda_=1.3, weighted_election=weighted)
    assert same_bits(got, want)


# ------------------------------------------------------------------------------------------ fold


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("base_coef", [0.4, 1.0])
def test_fold_kernel_is_bitwise_the_blockwise_torch_fold(dtype, base_coef):
    base, fts = checkpoint_like(dtype, seed=5)
    coefs = [0.5, 0.3, -0.2]
    acc = base.to(torch.float32, copy=True)
    if base_coef != 1.0:
        acc.mul_(base_coef)
    for c, f in zip(coefs, fts):
        add_scaled_(acc, f, c)
    got = K.fold(base, base_coef, list(zip(coefs, fts)))
    assert same_bits(got, acc)
    assert same_bits(K.fold(base, base_coef, list(zip(coefs, fts)), torch.bfloat16), acc.to(torch.bfloat16))


def test_scale_into_computes_in_fp32():
    x = torch.randn(5000).to(torch.bfloat16)
    acc = torch.empty(5000)
    scale_into_(acc, x, 0.3)
    assert torch.equal(acc, x.float() * 0.3)  # torch.mul(x, 0.3, out=acc) rounds to bf16 first


def test_fold_kernel_declines_other_dtypes():
    base = torch.zeros(10, dtype=torch.float16)
    assert K.fold(base, 0.5, [(0.5, base.clone())]) is None


# ------------------------------------------------------------------------------------------ engine


def _recipe(path, **data):
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "method,params,dtype",
    [
        ("ties", {"density": 0.3, "weighted_election": True}, "bfloat16"),
        ("ties", {"density": [0.2, 0.7]}, "float32"),
        ("dare_ties", {"density": 0.4}, "bfloat16"),
        ("dare_linear", {"density": 0.6, "normalize": True}, "float32"),
        ("task_arithmetic", {"lambda": 0.8}, "bfloat16"),
    ],
)
def test_engine_output_is_byte_identical_with_and_without_kernels(zoo, tmp_path, monkeypatch, method, params, dtype):
    from hf_taskarith.method_merge import run_recipe
    from hf_taskarith.recipe import load_recipe

    tasks = [{"model": str(zoo["llama_ft_a"]), "weight": 0.6}, {"model": str(zoo["llama_ft_b"]), "weight": 0.5}]
    if isinstance(params.get("density"), list):
        tasks[0]["parameters"] = {"density": params["density"][0]}
        tasks[1]["parameters"] = {"density": params["density"][1]}
        params = {k: v for k, v in params.items() if k != "density"}
    r = _recipe(tmp_path / "r.yaml", base=str(zoo["llama_base"]), method=method, parameters=params, tasks=tasks,
                dtype=dtype, seed=3)
    calls = []
    for fn in ("ties", "dare", "fold"):
        orig = getattr(K, fn)
        monkeypatch.setattr(K, fn, lambda *a, _orig=orig, _fn=fn, **k: calls.append(_fn) or _orig(*a, **k))
    fused = run_recipe(load_recipe(r), tmp_path / "fused", progress=False)
    assert calls, "the kernels were not used"
    monkeypatch.setenv("HF_TASKARITH_FUSED", "0")
    calls.clear()
    plain = run_recipe(load_recipe(r), tmp_path / "plain", progress=False)
    assert not calls
    files = sorted(p.name for p in fused.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in plain.glob("*.safetensors"))
    for name in files:
        assert (fused / name).read_bytes() == (plain / name).read_bytes(), name


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_mapped_inputs_walked_range_by_range_give_the_same_bytes(zoo, tmp_path, monkeypatch, method):
    """Every input mapped (even small ones) and filled/dropped in one-chunk ranges: same output."""
    from hf_taskarith import checkpoint as C
    from hf_taskarith.method_merge import run_recipe
    from hf_taskarith.recipe import load_recipe

    tasks = [{"model": str(zoo["llama_ft_a"]), "weight": 0.7}, {"model": str(zoo["llama_ft_b"]), "weight": 0.4}]
    r = _recipe(tmp_path / "r.yaml", base=str(zoo["llama_base"]), method=method, tasks=tasks, dtype="bfloat16",
                parameters={} if method == "task_arithmetic" else {"density": 0.3}, seed=1)
    monkeypatch.setenv("HF_TASKARITH_FUSED", "0")
    plain = run_recipe(load_recipe(r), tmp_path / "plain", progress=False)
    monkeypatch.delenv("HF_TASKARITH_FUSED")
    monkeypatch.setattr(C, "_VIEW_MIN_BYTES", 1)
    monkeypatch.setattr(K, "_RANGE", K.CHUNK)
    calls = {"populate": 0, "release": 0}
    for name in calls:
        orig = getattr(C.MappedWindow, name)
        monkeypatch.setattr(C.MappedWindow, name, lambda self, lo, hi, _o=orig, _n=name: calls.__setitem__(_n, calls[_n] + 1) or _o(self, lo, hi))
    fused = run_recipe(load_recipe(r), tmp_path / "fused", progress=False)
    assert calls["populate"] > 0 and calls["populate"] == calls["release"]
    for p in sorted(plain.glob("*.safetensors")):
        assert (fused / p.name).read_bytes() == p.read_bytes(), p.name


def test_kernels_on_mapped_views_over_several_ranges_match_plain_tensors(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from hf_taskarith import checkpoint as C

    base, fts = checkpoint_like(torch.bfloat16, seed=6, quantise=True)
    for i, t in enumerate([base, *fts]):
        (tmp_path / str(i)).mkdir()
        save_file({"w": t}, str(tmp_path / str(i) / "model.safetensors"))
    monkeypatch.setattr(C, "_VIEW_MIN_BYTES", 1)
    monkeypatch.setattr(K, "_RANGE", K.CHUNK)  # 4 ranges per tensor
    stores = [C.open_checkpoint(tmp_path / str(i)) for i in range(4)]
    with C.mapped_reads():
        mapped = [s.get("w") for s in stores]
    assert all(C.mapped_window(t) is not None for t in mapped)
    n = base.numel()
    kw = dict(ks=[int(0.3 * n)] * 3, weighted_election=True, out_dtype=torch.bfloat16)
    assert same_bits(K.ties(mapped[0], mapped[1:], [0.5, 0.3, 0.2], **kw), K.ties(base, fts, [0.5, 0.3, 0.2], **kw))
    keys = [M.dare_key(5, i) for i in range(3)]
    assert same_bits(K.dare(mapped[0], mapped[1:], [0.5, 0.3, 0.2], keys=keys, densities=[0.4] * 3),
                     K.dare(base, fts, [0.5, 0.3, 0.2], keys=keys, densities=[0.4] * 3))
    terms = list(zip([0.5, 0.3, 0.2], mapped[1:]))
    assert same_bits(K.fold(mapped[0], 0.0, terms), K.fold(base, 0.0, list(zip([0.5, 0.3, 0.2], fts))))


def test_mapped_reads_give_the_same_values(zoo):
    from hf_taskarith import checkpoint as C

    store = C.open_checkpoint(zoo["llama_base"])
    big = max(store.keys(), key=lambda n: store.info(n).nbytes)
    assert store.info(big).nbytes >= 1 << 10
    old = C._VIEW_MIN_BYTES
    C._VIEW_MIN_BYTES = 1  # map even the zoo's small tensors
    try:
        with C.mapped_reads():
            views = {n: store.get(n) for n in store.keys()}
    finally:
        C._VIEW_MIN_BYTES = old
    for n, v in views.items():
        assert torch.equal(v, store.get(n)), n
    # A write to a view copies the page: the file and later reads are unchanged.
    before = store.get(big).clone()
    views[big].view(-1)[0] = views[big].view(-1)[0] + 1
    assert torch.equal(store.get(big), before)
