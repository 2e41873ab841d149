"""LoRA-native merge math (hf_taskarith.lora_merge) against independent references.

References are written here with plain torch on DENSE matrices (the module never forms them):
``dense_delta`` (Σ c_i B_i A_i in float64), ``torch.linalg.svd``/``svdvals`` of the dense sum, a dense
KnOTS with a hand-written TIES/DARE, hand-derived literals, and PEFT itself (``add_weighted_adapter``
``cat``/``svd`` and ``get_delta_weight`` for the scaling and Conv1D/embedding orientation conventions).
"""

from __future__ import annotations

import math

import pytest
import torch

from hf_taskarith import lora_merge as LM
from hf_taskarith.errors import IncompatibleTensorsError, RecipeError


def dense_delta(factors):
    """Test helper: ΔW = Σ c_i B_i A_i as a dense float64 matrix."""
    a0, b0, _ = factors[0]
    out = torch.zeros(b0.shape[0], a0.shape[1], dtype=torch.float64)
    for a, b, c in factors:
        out += float(c) * (b.double() @ a.double())
    return out


def product(a, b):
    return b.double() @ a.double()


def rel(got, want):
    got, want = got.detach(), want.detach()
    return float((got - want).norm() / want.norm())


def make_factors(ranks, coefs, out, inn, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [
        ((torch.randn(r, inn, generator=g) / math.sqrt(inn)).to(dtype), torch.randn(out, r, generator=g).to(dtype), c)
        for r, c in zip(ranks, coefs)
    ]


RANKS, COEFS = (2, 4, 8), (0.7, -1.3, 2.0)
SHAPES = [(24, 40), (40, 24), (10, 30), (6, 9)]  # out x in; the last two have Σr = 14 > min(out, in)


# --------------------------------------------------------------------------------------------
# merge_exact
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("out,inn", SHAPES)
def test_exact_concatenation_reproduces_the_weighted_sum(out, inn):
    factors = make_factors(RANKS, COEFS, out, inn)
    a, b = LM.merge_exact(factors)
    assert a.shape == (14, inn) and b.shape == (out, 14) and a.dtype == torch.float32
    assert rel(product(a, b), dense_delta(factors)) < 1e-6


def test_exact_accepts_bf16_and_computes_in_fp32():
    factors = make_factors(RANKS, COEFS, 24, 40, dtype=torch.bfloat16)
    a, b = LM.merge_exact(factors)
    assert a.dtype == b.dtype == torch.float32
    assert rel(product(a, b), dense_delta(factors)) < 1e-6


def test_exact_equals_peft_cat():
    from peft import LoraConfig, get_peft_model

    g = torch.Generator().manual_seed(1)
    model = get_peft_model(Tiny(), LoraConfig(r=2, lora_alpha=4, target_modules=["lin"]), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=4, lora_alpha=3, use_rslora=True, target_modules=["lin"]))
    lin = model.base_model.model.lin
    for name in ("a", "b"):
        set_lora(lin, name, g)
    model.add_weighted_adapter(["a", "b"], [0.7, -1.3], "m", combination_type="cat")
    factors = [
        (lin.lora_A[n].weight.detach(), lin.lora_B[n].weight.detach(), w * lin.scaling[n])
        for n, w in (("a", 0.7), ("b", -1.3))
    ]
    a, b = LM.merge_exact(factors)
    torch.testing.assert_close(a, lin.lora_A["m"].weight.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(b, lin.lora_B["m"].weight.detach(), rtol=0, atol=0)
    assert lin.scaling["m"] == 1.0  # PEFT writes lora_alpha = r: our scaling-1 convention
    assert rel(lin.get_delta_weight("m").double(), dense_delta(factors)) < 1e-6


# --------------------------------------------------------------------------------------------
# merge_svd
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("out,inn", SHAPES)
@pytest.mark.parametrize("rank", [1, 3, 5, 9, 14, 20])
def test_svd_error_equals_dense_truncated_svd(out, inn, rank):
    factors = make_factors(RANKS, COEFS, out, inn, seed=2)
    want = dense_delta(factors)
    s = torch.linalg.svd(want).S  # Eckart–Young: the best rank-r error is √Σ_{j>=r} S_j²
    best = float(s[rank:].pow(2).sum().sqrt())
    res = LM.merge_svd(factors, rank=rank)
    assert res.A.shape == (rank, inn) and res.B.shape == (out, rank) and res.rank == rank
    err = float((product(res.A, res.B) - want).norm())
    assert err == pytest.approx(best, rel=1e-5, abs=1e-6 * float(want.norm()))
    n = min(14, out, inn)
    torch.testing.assert_close(res.singular_values[:n], s[:n], rtol=1e-5, atol=1e-6 * float(s[0]))


@pytest.mark.parametrize("out,inn", SHAPES)
def test_svd_default_is_lossless_at_the_numerical_rank(out, inn):
    factors = make_factors(RANKS, COEFS, out, inn, seed=3)
    res = LM.merge_svd(factors)
    assert res.rank == min(14, out, inn)
    assert rel(product(res.A, res.B), dense_delta(factors)) < 1e-6


def test_svd_factors_are_balanced():
    res = LM.merge_svd(make_factors(RANKS, COEFS, 24, 40, seed=4), rank=5)
    # B = Q_B U S^½, A = S^½ Vᵀ Q_Aᵀ: column j of B and row j of A both have norm √S_j
    s = res.singular_values[:5].float()
    torch.testing.assert_close(res.B.norm(dim=0), s.sqrt(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.A.norm(dim=1), s.sqrt(), rtol=1e-5, atol=1e-6)


def expected_energy_rank(s, energy):
    """Smallest r with Σ_{j<r} S_j² >= energy·Σ S² (a loop over the dense singular values)."""
    p = [float(x) ** 2 for x in s]
    total = sum(p)
    acc = 0.0
    for r, x in enumerate(p, start=1):
        acc += x
        if acc / total >= energy - 1e-12:
            return r
    return len(p)


@pytest.mark.parametrize("energy", [0.3, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0])
def test_svd_energy_picks_the_dense_rank(energy):
    factors = make_factors(RANKS, COEFS, 24, 40, seed=5)
    want = dense_delta(factors)
    s = torch.linalg.svdvals(want)
    frac = torch.cumsum(s**2, 0) / (s**2).sum()
    assert float((frac - energy).abs().min()) > 1e-6 or energy == 1.0  # not on a boundary
    r = expected_energy_rank(s[:14], energy)
    res = LM.merge_svd(factors, energy=energy)
    assert res.rank == r and res.A.shape == (r, 40) and res.B.shape == (24, r)
    err = float((product(res.A, res.B) - want).norm())
    assert err == pytest.approx(float(s[r:].pow(2).sum().sqrt()), rel=1e-5, abs=1e-6 * float(want.norm()))
    capped = LM.merge_svd(factors, rank=2, energy=energy)  # rank caps the energy rank
    assert capped.rank == min(2, r)


def test_energy_rank_helper():
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14: cumulative 0.643, 0.929, 1
    assert [LM.energy_rank(s, e) for e in (0.1, 0.6, 0.7, 0.92, 0.95, 1.0)] == [1, 1, 2, 2, 3, 3]
    assert LM.energy_rank(torch.tensor([9.0, 4.0, 1.0]).sqrt(), 9 / 14) == 1  # boundary counts as reached
    assert LM.energy_rank(torch.zeros(4), 0.9) == 0
    with pytest.raises(RecipeError):
        LM.energy_rank(s, 0.0)
    with pytest.raises(RecipeError):
        LM.energy_rank(s, 1.5)


def test_svd_zero_and_cancelling_updates():
    (a, b, _), other = make_factors((4, 3), (1.0, 1.0), 12, 20, seed=6)
    cancel = [(a, b, 1.5), (a * 3, b, -0.5)]  # 1.5·BA − 1.5·BA = 0 up to rounding
    for factors in (cancel, [(a, b, 0.0), (other[0], other[1], 0.0)]):
        res = LM.merge_svd(factors)
        assert res.rank == 0 and res.A.shape == (0, 20) and res.B.shape == (12, 0)
        assert LM.merge_svd(factors, energy=0.9).rank == 0
        fixed = LM.merge_svd(factors, rank=3)  # a fixed rank is honoured with zero factors
        assert fixed.A.shape == (3, 20) and fixed.B.shape == (12, 3)
        assert not torch.any(product(fixed.A, fixed.B))
    empty = LM.merge_svd([(torch.zeros(0, 20), torch.zeros(12, 0), 1.0)])
    assert empty.rank == 0 and empty.A.shape == (0, 20)


def test_svd_accepts_bf16_and_computes_in_fp32():
    factors = make_factors(RANKS, COEFS, 24, 40, seed=7, dtype=torch.bfloat16)
    res = LM.merge_svd(factors, rank=4)
    assert res.A.dtype == res.B.dtype == torch.float32
    want = dense_delta(factors)
    best = float(torch.linalg.svdvals(want)[4:].pow(2).sum().sqrt())
    assert float((product(res.A, res.B) - want).norm()) == pytest.approx(best, rel=1e-5)


@pytest.mark.parametrize("rank", [2, 5])
def test_svd_matches_peft_svd_error(rank):
    from peft import LoraConfig, get_peft_model

    g = torch.Generator().manual_seed(8)
    model = get_peft_model(Tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["lin"]), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=4, lora_alpha=2, target_modules=["lin"]))
    lin = model.base_model.model.lin
    for name in ("a", "b"):
        set_lora(lin, name, g)
    weights = [0.6, -0.9]
    model.add_weighted_adapter(["a", "b"], weights, "m", combination_type="svd", svd_rank=rank)
    with torch.no_grad():
        want = 0.6 * lin.get_delta_weight("a").double() - 0.9 * lin.get_delta_weight("b").double()
        got_peft = lin.get_delta_weight("m").double()
    factors = [(lin.lora_A[n].weight.detach(), lin.lora_B[n].weight.detach(), w * lin.scaling[n]) for n, w in zip("ab", weights)]
    ours = LM.merge_svd(factors, rank=rank)
    err_ours = float((product(ours.A, ours.B) - want).norm())
    err_peft = float((got_peft - want).norm())  # PEFT: SVD of the dense ΔW
    assert err_ours == pytest.approx(err_peft, rel=1e-5)


# --------------------------------------------------------------------------------------------
# to_peft_factors and PEFT's conventions (scaling, Conv1D fan_in_fan_out, embeddings)
# --------------------------------------------------------------------------------------------

IN, OUT, VOCAB, DIM = 40, 24, 30, 16


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.lin = torch.nn.Linear(IN, OUT, bias=False)
        self.conv = Conv1D(OUT, IN)  # GPT-2 style: weight stored (in x out)
        self.emb = torch.nn.Embedding(VOCAB, DIM)


def set_lora(layer, name, g):
    """Random LoRA factors (PEFT initialises B to zero)."""
    if name in layer.lora_A:
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    else:
        a, b = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    with torch.no_grad():
        a.copy_(torch.randn(a.shape, generator=g) / math.sqrt(a.shape[1]))
        b.copy_(torch.randn(b.shape, generator=g))


def factors_of(layer, name):
    if name in layer.lora_A:
        return layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()
    return layer.lora_embedding_A[name].detach(), layer.lora_embedding_B[name].detach()


@pytest.mark.parametrize("r,alpha,rslora", [(6, 6, False), (6, 16, False), (6, 16, True), (6, 3, True)])
def test_to_peft_factors_reproduces_delta_under_peft_scaling(r, alpha, rslora):
    from peft import LoraConfig, get_peft_model

    factors = make_factors((4, 5), (0.8, -1.1), OUT, IN, seed=9)
    res = LM.merge_svd(factors, rank=r)
    a, b = LM.to_peft_factors(res.A, res.B, r, alpha, use_rslora=rslora)
    s = alpha / math.sqrt(r) if rslora else alpha / r
    assert float(a.norm() / b.norm()) == pytest.approx(float(res.A.norm() / res.B.norm()), rel=1e-6)  # √s each side
    model = get_peft_model(Tiny(), LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["lin"]))
    lin = model.base_model.model.lin
    assert lin.scaling["default"] == pytest.approx(s)
    with torch.no_grad():
        lin.lora_A["default"].weight.copy_(a)
        lin.lora_B["default"].weight.copy_(b)
    assert rel(lin.get_delta_weight("default").double(), product(res.A, res.B)) < 1e-6


def test_to_peft_factors_negative_alpha_and_errors():
    a, b = torch.randn(3, 7), torch.randn(5, 3)
    a2, b2 = LM.to_peft_factors(a, b, 3, -12.0)  # s = −4
    torch.testing.assert_close(-4.0 * (b2 @ a2), b @ a)
    assert LM.to_peft_factors(a, b, 3, 3.0) == (a, b)
    with pytest.raises(ValueError):
        LM.to_peft_factors(a, b, 4, 8.0)  # r must match the factors
    with pytest.raises(ValueError):
        LM.to_peft_factors(a, b, 3, 0.0)


def test_conv1d_and_embedding_factors_in_peft_stored_orientation():
    """Callers pass PEFT's stored factors; PEFT itself transposes for Conv1D (fan_in_fan_out) and embeddings."""
    from peft import LoraConfig, get_peft_model

    g = torch.Generator().manual_seed(10)
    targets = ["conv", "emb"]
    model = get_peft_model(Tiny(), LoraConfig(r=2, lora_alpha=4, target_modules=targets), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=4, lora_alpha=4, use_rslora=True, target_modules=targets))
    model.add_adapter("m", LoraConfig(r=6, lora_alpha=12, target_modules=targets))
    weights = {"a": 0.7, "b": -1.3}
    for attr in targets:
        layer = getattr(model.base_model.model, attr)
        for name in weights:
            set_lora(layer, name, g)
        factors = [(*factors_of(layer, n), w * layer.scaling[n]) for n, w in weights.items()]
        res = LM.merge_svd(factors, rank=6)  # total rank 6: exact
        a, b = LM.to_peft_factors(res.A, res.B, 6, 12)
        tgt_a, tgt_b = factors_of(layer, "m")
        assert tgt_a.shape == a.shape and tgt_b.shape == b.shape
        with torch.no_grad():
            tgt_a.copy_(a)
            tgt_b.copy_(b)
        want = sum(w * layer.get_delta_weight(n).double() for n, w in weights.items())
        assert want.shape == layer.get_base_layer().weight.shape  # stored orientation (in x out / vocab x dim)
        assert rel(layer.get_delta_weight("m").double(), want) < 1e-6, attr


# --------------------------------------------------------------------------------------------
# KnOTS
# --------------------------------------------------------------------------------------------


def ties_reference(zs, density, weights=None, lam=1.0):
    """TIES written out: per-task top-k, elect sign of the sum (0 → +), weighted disjoint mean."""
    w = weights or [1.0] * len(zs)
    trimmed = []
    for z in zs:
        k = int(density * z.numel())
        keep = torch.zeros(z.numel(), dtype=torch.bool)
        keep[z.flatten().abs().argsort(descending=True)[:k]] = True
        trimmed.append(torch.where(keep.view_as(z), z, torch.zeros_like(z)))
    sign = torch.where(sum(trimmed) >= 0, 1.0, -1.0).to(zs[0].dtype)
    num = sum(wi * torch.where(t * sign > 0, t, torch.zeros_like(t)) for wi, t in zip(w, trimmed))
    count = sum((t * sign > 0).to(zs[0].dtype) for t in trimmed).clamp(min=1.0)
    return lam * num / count


def dense_knots(factors, merge):
    """KnOTS on dense matrices: SVD of [ΔW_1 … ΔW_n], Z_i = S V_iᵀ, ΔW = U·merge(Z)."""
    deltas = [float(c) * product(a, b) for a, b, c in factors]
    u, s, vh = torch.linalg.svd(torch.cat(deltas, dim=1), full_matrices=False)
    keep = s > 1e-10 * s[0]
    u, s, vh = u[:, keep], s[keep], vh[keep]
    n_in = deltas[0].shape[1]
    zs = [s[:, None] * vh[:, i * n_in:(i + 1) * n_in] for i in range(len(deltas))]
    return u @ merge(zs)


@pytest.mark.parametrize("out,inn", SHAPES)
def test_knots_task_arithmetic_reproduces_the_exact_sum(out, inn):
    factors = make_factors(RANKS, COEFS, out, inn, seed=11)
    want = dense_delta(factors)
    res = LM.knots_merge(factors, "task_arithmetic")
    assert res.rank == min(14, out) and res.B.shape == (out, res.rank) and res.A.shape == (res.rank, inn)
    torch.testing.assert_close(res.B.T @ res.B, torch.eye(res.rank), atol=1e-5, rtol=0)  # orthonormal basis
    assert rel(product(res.A, res.B), want) < 1e-6
    half = LM.knots_merge(factors, "task_arithmetic", **{"lambda": 0.5})
    assert rel(product(half.A, half.B), 0.5 * want) < 1e-6


@pytest.mark.parametrize("density", [1.0, 0.5, 0.2])
def test_knots_ties_matches_dense_knots(density):
    factors = make_factors((2, 3, 4), (0.9, -0.6, 1.4), 12, 10, seed=12, dtype=torch.float64)
    want = dense_knots(factors, lambda zs: ties_reference(zs, density))
    res = LM.knots_merge(factors, "ties", density=density)
    assert res.rank == 9
    assert rel(product(res.A, res.B), want) < 1e-9
    s = torch.linalg.svdvals(torch.cat([float(c) * product(a, b) for a, b, c in factors], dim=1))[:9]
    torch.testing.assert_close(res.basis_singular_values, s, rtol=1e-10, atol=0)


def test_knots_with_separate_weights_matches_dense_ties_semantics():
    """weights=: c_i = s_i only, TIES elects on the unweighted blocks and applies w_i after."""
    scaled = make_factors((3, 3, 2), (0.5, 2.0, 1.0), 12, 10, seed=13, dtype=torch.float64)
    w = [1.5, -0.4, 0.8]
    want = dense_knots(scaled, lambda zs: ties_reference(zs, 0.5, weights=w, lam=0.7))
    res = LM.knots_merge(scaled, "ties", weights=w, density=0.5, lambda_=0.7)
    assert rel(product(res.A, res.B), want) < 1e-9


def test_knots_dare_ties_matches_dense_knots_with_the_same_draws():
    factors = make_factors((2, 4), (1.0, -0.8), 12, 10, seed=14, dtype=torch.float64)
    d = 0.6

    def dare_then_ties(zs):
        g = torch.Generator().manual_seed(5)
        dropped = [z * torch.bernoulli(torch.full_like(z, d), generator=g) / d for z in zs]
        return ties_reference(dropped, 1.0)

    want = dense_knots(factors, dare_then_ties)
    # rng="torch": the torch.bernoulli draws of the reference (the default counter masks differ)
    res = LM.knots_merge(factors, "dare_ties", density=d, seed=5, rng="torch")
    assert rel(product(res.A, res.B), want) < 1e-9
    counter = LM.knots_merge(factors, "dare_ties", density=d, seed=5)  # default rng: counter masks
    assert torch.equal(counter.A, LM.knots_merge(factors, "dare_ties", density=d, seed=5).A)
    assert not torch.equal(counter.A, LM.knots_merge(factors, "dare_ties", density=d, seed=6).A)
    no_drop = LM.knots_merge(factors, "dare_ties", density=1.0, seed=5)
    ties = LM.knots_merge(factors, "ties", density=1.0)
    torch.testing.assert_close(no_drop.A, ties.A)


def test_knots_ties_of_identical_adapters_is_one_adapter():
    (a, b, _), = make_factors((4,), (1.0,), 20, 16, seed=15)
    factors = [(a, b, 0.8)] * 3
    res = LM.knots_merge(factors, "ties", density=1.0)
    assert rel(product(res.A, res.B), 0.8 * product(a, b)) < 1e-5  # disjoint mean of equal blocks
    ta = LM.knots_merge(factors, "task_arithmetic")
    assert rel(product(ta.A, ta.B), 2.4 * product(a, b)) < 1e-5


def test_knots_ties_on_disjoint_output_subspaces_is_lossless():
    """Adapters writing to disjoint output rows do not interfere: TIES = the exact sum."""
    g = torch.Generator().manual_seed(16)
    b1, b2 = torch.zeros(8, 2), torch.zeros(8, 2)
    b1[:4], b2[4:] = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    factors = [(torch.randn(2, 10, generator=g), b1, 1.2), (torch.randn(2, 10, generator=g), b2, -0.7)]
    res = LM.knots_merge(factors, "ties", density=0.5)  # each block fills half of the 4 x 10 coefficients
    assert res.rank == 4
    assert rel(product(res.A, res.B), dense_delta(factors)) < 1e-5


def test_knots_hand_computed_tiny_case():
    # ΔW_1 = 2·e1⊗[1, −0.5] = e1⊗[2, −1];  ΔW_2 = 0.5·(2e1)⊗[1, 2] = e1⊗[1, 2]   (out = 3, in = 2)
    # [ΔW_1 ΔW_2] = e1⊗[2, −1, 1, 2]: rank 1, S = √10, U = ±e1, Z_1 = ±[2, −1], Z_2 = ±[1, 2].
    # TIES density 1: signs (+, +); column 0 mean(2, 1) = 1.5, column 1 only task 2 agrees → 2.
    # TIES density 0.5 (k = 1): Ẑ_1 = [2, 0], Ẑ_2 = [0, 2] → [2, 2].   TA: [3, 1].
    e1 = torch.tensor([[1.0], [0.0], [0.0]])
    factors = [(torch.tensor([[1.0, -0.5]]), e1, 2.0), (torch.tensor([[1.0, 2.0]]), 2 * e1, 0.5)]
    cases = {("ties", 1.0): [1.5, 2.0], ("ties", 0.5): [2.0, 2.0], ("task_arithmetic", None): [3.0, 1.0]}
    for (method, density), row in cases.items():
        res = LM.knots_merge(factors, method, **({"density": density} if density else {}))
        assert res.rank == 1
        assert res.basis_singular_values.tolist() == pytest.approx([math.sqrt(10)])
        want = torch.zeros(3, 2, dtype=torch.float64)
        want[0] = torch.tensor(row)
        torch.testing.assert_close(product(res.A, res.B), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_knots_truncation_is_the_best_approximation_of_the_merge(rank):
    factors = make_factors(RANKS, COEFS, 24, 40, seed=17)
    full = LM.knots_merge(factors, "ties", density=0.4)
    merged = product(full.A, full.B)
    res = LM.knots_merge(factors, "ties", rank=rank, density=0.4)
    assert res.A.shape == (rank, 40) and res.B.shape == (24, rank)
    best = float(torch.linalg.svdvals(merged)[rank:].pow(2).sum().sqrt())
    assert float((product(res.A, res.B) - merged).norm()) == pytest.approx(best, rel=1e-5)
    s = torch.linalg.svdvals(merged)
    assert LM.knots_merge(factors, "ties", energy=0.9, density=0.4).rank == expected_energy_rank(s[:14], 0.9)


def test_knots_zero_update():
    (a, b, _), = make_factors((3,), (1.0,), 12, 20, seed=18)
    res = LM.knots_merge([(a, b, 1.0), (a, b, 0.0)], "ties")
    assert res.rank == 3  # only the first adapter spans the basis
    res = LM.knots_merge([(a, b, 0.0), (a, b, 0.0)], "ties")
    assert res.rank == 0 and res.A.shape == (0, 20) and res.B.shape == (12, 0)


def test_knots_method_errors():
    factors = make_factors((2, 2, 2), (1.0, 1.0, 1.0), 12, 10, seed=19)
    with pytest.raises(RecipeError, match="unknown method"):
        LM.knots_merge(factors, "nope")
    with pytest.raises(RecipeError, match="layers"):
        LM.knots_merge(factors[:2], "hierarchical")
    with pytest.raises(RecipeError, match="inputs"):
        LM.knots_merge(factors, "slerp")
    with pytest.raises(RecipeError, match="unknown parameter"):
        LM.knots_merge(factors, "ties", densty=0.5)
    with pytest.raises(RecipeError, match="density"):
        LM.knots_merge(factors, "ties", density=1.5)
    with pytest.raises(RecipeError, match="weights"):
        LM.knots_merge(factors, "ties", weights=[1.0, 2.0])


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


def test_input_validation():
    good = make_factors((2, 3), (1.0, 1.0), 12, 10, seed=20)
    with pytest.raises(ValueError):
        LM.merge_exact([])
    with pytest.raises(IncompatibleTensorsError, match="ranks differ"):
        LM.merge_exact([(torch.zeros(2, 10), torch.zeros(12, 3), 1.0)])
    with pytest.raises(IncompatibleTensorsError, match="shape"):
        LM.merge_svd(good + [(torch.zeros(2, 11), torch.zeros(12, 2), 1.0)])
    with pytest.raises(ValueError, match="finite"):
        LM.merge_exact([(good[0][0], good[0][1], float("nan"))])
    with pytest.raises(RecipeError, match="rank"):
        LM.merge_svd(good, rank=-1)
    with pytest.raises(RecipeError, match="energy"):
        LM.merge_svd(good, energy=1.5)
