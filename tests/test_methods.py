"""Merge methods (hf_taskarith.methods) against hand-derived numbers, invariants and PEFT.

Expected values are literals derived by hand in the comments (small tensors), not recomputed with
the implementation. PEFT's ``peft.utils.merge_utils`` is a second, independent implementation for
the methods whose semantics match (ties, magnitude_prune, dare_linear, dare_ties).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from hf_taskarith import methods as M
from hf_taskarith.errors import RecipeError

T = torch.tensor


def close(got, want, atol=1e-6, rtol=1e-6):
    torch.testing.assert_close(got, torch.as_tensor(want, dtype=got.dtype), atol=atol, rtol=rtol)


def zeros_base(shape):
    return torch.zeros(shape)


# Three task vectors of 6 entries used by the TIES family (density 0.5 → k = int(0.5·6) = 3):
#   τ1 = [4, -3, 0.5, 1, -2, 0.25]   |τ1| top-3 = 4, 3, 2       → τ̂1 = [4, -3, 0, 0, -2, 0]
#   τ2 = [-1, 2, 3, -0.5, -5, 0.1]   |τ2| top-3 = 5, 3, 2       → τ̂2 = [0, 2, 3, 0, -5, 0]
#   τ3 = [2, 1, -1, 3, 0.5, -4]      |τ3| top-3 = 4, 3, 2       → τ̂3 = [2, 0, 0, 3, 0, -4]
TIES_DELTAS = T([[4.0, -3.0, 0.5, 1.0, -2.0, 0.25], [-1.0, 2.0, 3.0, -0.5, -5.0, 0.1], [2.0, 1.0, -1.0, 3.0, 0.5, -4.0]])


# --------------------------------------------------------------------------------------------
# Registry and parameter validation
# --------------------------------------------------------------------------------------------

EXPECTED = {
    "task_arithmetic", "linear", "slerp", "ties", "magnitude_prune", "dare_linear", "dare_ties", "della",
    "della_linear", "breadcrumbs", "breadcrumbs_ties", "model_stock", "tsv", "iso_c", "iso_cts", "consensus",
    "pcb", "hierarchical",
}


def test_registry_lists_every_method_with_metadata():
    assert set(M.METHODS) == EXPECTED
    for name, spec in M.METHODS.items():
        assert spec.name == name
        assert "arXiv" in spec.paper or "http" in spec.paper or "PEFT" in spec.paper or "mergekit" in spec.paper
        assert spec.formula and spec.fn.__doc__
        assert spec.scope in ("tensor", "layer")
        assert spec.max_tasks is None or spec.max_tasks >= spec.min_tasks
    assert not M.METHODS["linear"].needs_base and not M.METHODS["slerp"].needs_base
    assert M.METHODS["ties"].needs_base and M.METHODS["model_stock"].needs_base
    assert {n for n, s in M.METHODS.items() if s.stochastic} == {"dare_linear", "dare_ties", "della", "della_linear"}
    assert M.METHODS["hierarchical"].scope == "layer"
    assert (M.METHODS["slerp"].min_tasks, M.METHODS["slerp"].max_tasks) == (2, 2)


def test_defaults_are_exactly_the_keyword_parameters():
    # The engine passes every default as a keyword (lambda → lambda_), plus generator if stochastic.
    for name, spec in M.METHODS.items():
        if spec.scope != "tensor":
            continue
        params = inspect.signature(spec.fn).parameters
        kw = {p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY}
        kw -= {"generator", "thresholds", "key"}
        assert kw == {"lambda_" if k == "lambda" else k for k in spec.defaults}, name
        assert ("generator" in params) == spec.stochastic, name


@pytest.mark.parametrize("name", sorted(EXPECTED - {"hierarchical"}))
def test_every_method_runs_with_its_defaults_and_leaves_inputs_alone(name):
    spec = M.METHODS[name]
    torch.manual_seed(0)
    n = 2 if spec.max_tasks == 2 else 3
    deltas, weights, base = torch.randn(n, 6, 5), torch.tensor([1.0, 0.5, 2.0][:n]), torch.randn(6, 5)
    copies = (deltas.clone(), weights.clone(), base.clone())
    kwargs = {("lambda_" if k == "lambda" else k): v for k, v in spec.defaults.items()}
    if spec.stochastic:
        kwargs["generator"] = torch.Generator().manual_seed(0)
    out = spec.fn(deltas, weights, base, **kwargs)
    assert out.shape == base.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    for a, b in zip((deltas, weights, base), copies):
        assert torch.equal(a, b)


def test_get_method_unknown_name_lists_known_ones():
    assert M.get_method("ties") is M.METHODS["ties"]
    with pytest.raises(RecipeError) as err:
        M.get_method("tie")
    assert "'tie'" in str(err.value) and "ties" in str(err.value) and "model_stock" in str(err.value)


@pytest.mark.parametrize(
    "method,params,field",
    [
        ("ties", {"densty": 0.2}, "densty"),
        ("ties", {"density": 0.0}, "density"),
        ("ties", {"density": 1.5}, "density"),
        ("ties", {"density": True}, "density"),
        ("ties", {"density": [0.2, 1.2]}, "density"),
        ("ties", {"majority_sign_method": "mean"}, "majority_sign_method"),
        ("ties", {"weighted_election": "yes"}, "weighted_election"),
        ("ties", {"lambda": float("nan")}, "lambda"),
        ("breadcrumbs", {"gamma": 1.0}, "gamma"),
        ("breadcrumbs", {"gamma": -0.1}, "gamma"),
        ("della", {"density": 0.2, "epsilon": 0.25}, "epsilon"),
        ("della", {"density": 0.9, "epsilon": 0.15}, "epsilon"),
        ("dare_ties", {"rescale_method": "l2"}, "rescale_method"),
        ("slerp", {"t": 1.5}, "t"),
        ("slerp", {"lambda": 1.0}, "lambda"),
        ("consensus", {"k": -1}, "k"),
        ("consensus", {"k": 1.5}, "k"),
        ("iso_cts", {"common_space_fraction": 1.2}, "common_space_fraction"),
        ("pcb", {"ratio": 0}, "ratio"),
        ("linear", {"density": 0.5}, "density"),
    ],
)
def test_validate_params_names_the_bad_field(method, params, field):
    with pytest.raises(RecipeError) as err:
        M.validate_params(method, params)
    assert repr(field) in str(err.value) and repr(method) in str(err.value)


def test_validate_params_accepts_good_values():
    M.validate_params("ties", {"density": 0.2, "lambda": 0.7, "majority_sign_method": "frequency"})
    M.validate_params("ties", {"density": [0.2, 1.0], "weighted_election": True, "normalize": False})
    M.validate_params("della", {"density": 0.5, "epsilon": 0.5})  # ε = min(d, 1 − d) is allowed
    M.validate_params("della", {"density": 0.3, "epsilon": 0.3, "rescale_method": "l1"})
    M.validate_params("della", {"epsilon": 0.1})  # checked against density only when both are given
    M.validate_params("breadcrumbs", {"density": 0.9, "gamma": 0.0})
    M.validate_params("consensus", {"k": 0, "lambdas": [0.2, 0.6], "alpha": 1.0})
    M.validate_params("pcb", {"ratio": 0.05, "n": None})
    M.validate_params("model_stock", {"filter_wise": True})
    with pytest.raises(RecipeError):
        M.validate_params("nope", {})


# --------------------------------------------------------------------------------------------
# Top-k helpers
# --------------------------------------------------------------------------------------------


def test_trim_threshold_and_topk_mask_by_hand():
    x = T([1.0, -3.0, 3.0, 2.0, 3.0, 0.0])  # magnitudes 1, 3, 3, 2, 3, 0
    assert float(M.trim_threshold(x, 2)) == 3.0  # 2nd largest magnitude
    assert float(M.trim_threshold(x, 4)) == 2.0
    assert float(M.trim_threshold(x, 6)) == 0.0
    assert math.isinf(float(M.trim_threshold(x, 0)))
    # exactly k; the three tied 3's are taken lowest index first
    assert M.topk_mask(x, 2).tolist() == [False, True, True, False, False, False]
    assert M.topk_mask(x, 3).tolist() == [False, True, True, False, True, False]
    assert M.topk_mask(x, 4).tolist() == [False, True, True, True, True, False]
    assert M.topk_mask(x, 0).sum() == 0 and M.topk_mask(x, 9).all()


def test_topk_mask_matches_torch_topk_without_ties():
    torch.manual_seed(1)
    x = torch.randn(37, 23)
    for k in (1, 17, 400, 850):
        want = torch.zeros(x.numel(), dtype=torch.bool)
        want[torch.topk(x.abs().view(-1), k).indices] = True
        assert torch.equal(M.topk_mask(x, k).view(-1), want)


def _check_topk_mask(x, k):
    m = M.topk_mask(x, k).view(-1)
    a = x.abs().view(-1)
    v = torch.kthvalue(a, a.numel() - k + 1).values
    assert int(m.sum()) == k
    assert m[a > v].all() and not m[a < v].any()
    tied = torch.nonzero(a == v).view(-1)
    need = k - int((a > v).sum())
    assert m[tied[:need]].all() and not m[tied[need:]].any()


def test_sampled_selection_is_exact_on_many_shapes(monkeypatch):
    # Shrink the sample so tensors of a few thousand entries take the bracketing path
    # (lo/hi inside and outside the sample), and compare with torch.kthvalue.
    monkeypatch.setattr(M, "_SAMPLE", 256)
    gen = torch.Generator().manual_seed(3)
    cases = [
        torch.randn(3000, generator=gen),
        torch.randn(50, 60, generator=gen) * torch.logspace(-3, 1, 60),  # structured scales
        (torch.randn(3000, generator=gen) * 4).round() / 4,  # heavy ties
        torch.zeros(2048),
        torch.cat([torch.zeros(2000), torch.randn(100, generator=gen)]),
    ]
    for x in cases:
        a = x.abs().reshape(-1)
        n = a.numel()
        for k in sorted({1, 2, 7, n // 100, n // 5, n // 2, n - n // 5, n - 3, n - 1, n} - {0}):
            assert float(M.trim_threshold(x, k)) == float(torch.kthvalue(a, n - k + 1).values), (k, n)
            _check_topk_mask(x, k)


def test_selection_on_a_large_tensor_is_exact():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1100, 1000, generator=gen)  # > 4·2^18 entries: the sampled path
    ties = (x * 8).round() / 8  # large tie groups, like bf16 deltas
    a, b = x.abs().view(-1), ties.abs().view(-1)
    n = a.numel()
    for k in (1, int(0.2 * n), n // 2, int(0.9 * n), n - 1):
        assert float(M.trim_threshold(x, k)) == float(torch.kthvalue(a, n - k + 1).values)
        assert float(M.trim_threshold(ties, k)) == float(torch.kthvalue(b, n - k + 1).values)
    _check_topk_mask(ties, int(0.2 * n))


# --------------------------------------------------------------------------------------------
# Task arithmetic, linear, SLERP
# --------------------------------------------------------------------------------------------


def test_task_arithmetic_by_hand():
    d = T([[1.0, -2.0, 3.0, 0.0], [0.5, 0.5, -1.0, 2.0]])
    w = T([1.0, 2.0])
    # Σ w τ = [1+1, -2+1, 3-2, 0+4] = [2, -1, 1, 4]; λ = 0.5 → [1, -0.5, 0.5, 2]
    close(M.task_arithmetic(d, w, zeros_base(4), lambda_=0.5), [1.0, -0.5, 0.5, 2.0])
    # normalize: / Σw = 3 → [2/3, -1/3, 1/3, 4/3] · 0.5
    close(M.task_arithmetic(d, w, zeros_base(4), lambda_=0.5, normalize=True), [1 / 3, -1 / 6, 1 / 6, 2 / 3])
    # negation: weight -1
    close(M.task_arithmetic(d[:1], T([-1.0]), zeros_base(4)), [-1.0, 2.0, -3.0, 0.0])


def test_task_arithmetic_one_task_lambda_one_is_tau():
    tau = torch.randn(1, 7, 3)
    assert torch.equal(M.task_arithmetic(tau, T([1.0]), torch.randn(7, 3)), tau[0])


def test_linear_by_hand():
    base = torch.ones(4)
    d = T([[1.0, 0.0, -1.0, 2.0], [3.0, 2.0, 1.0, 0.0]])  # θ1 = [2,1,0,3], θ2 = [4,3,2,1]
    w = T([1.0, 3.0])
    # normalize: (1·τ1 + 3·τ2)/4 = [10, 6, 2, 2]/4
    close(M.linear(d, w, base), [2.5, 1.5, 0.5, 0.5])
    # no normalize: θ = 1·θ1 + 3·θ2 = [14, 10, 6, 6] → delta = θ − θ0 = [13, 9, 5, 5]
    close(M.linear(d, w, base, normalize=False), [13.0, 9.0, 5.0, 5.0])
    with pytest.raises(RecipeError):
        M.linear(d, T([1.0, -1.0]), base)


def test_slerp_by_hand():
    # v0 = e1, v1 = e2: d = 0, Ω = π/2; t = 0.5 → sin(π/4)·(e1 + e2)
    close(M.slerp(T([[1.0, 0.0], [0.0, 1.0]]), T([1.0, 1.0]), zeros_base(2)), [0.70710678, 0.70710678])
    # Unnormalised tensors: v0 = [2, 0], v1 = [0, 1] → sin(π/4)·[2, 1]
    close(M.slerp(T([[2.0, 0.0], [0.0, 1.0]]), T([1.0, 1.0]), zeros_base(2)), [1.41421356, 0.70710678])
    # Base as an endpoint (zero delta): θ0 = [1, 0], θ1 = [0, 2] (τ1 = [-1, 2]), orthogonal.
    d = T([[0.0, 0.0], [-1.0, 2.0]])
    # t = 0.5: sin(π/4)·([1,0] + [0,2]) − θ0 = [0.70711 − 1, 1.41421]
    close(M.slerp(d, T([1.0, 1.0]), T([1.0, 0.0])), [-0.29289322, 1.41421356])
    # t = 1/3: s0 = sin(π/3) = √3/2, s1 = sin(π/6) = 1/2 → [√3/2, 1] − [1, 0]
    close(M.slerp(d, T([1.0, 1.0]), T([1.0, 0.0]), t=1 / 3), [-0.1339746, 1.0])
    # Colinear (|d| > 0.9995) → lerp: [1,1] and [2,2] at t = 0.5 → [1.5, 1.5]
    close(M.slerp(T([[1.0, 1.0], [2.0, 2.0]]), T([1.0, 1.0]), zeros_base(2)), [1.5, 1.5])


def test_slerp_endpoints_are_exact():
    torch.manual_seed(2)
    d, base = torch.randn(2, 5, 4), torch.randn(5, 4)
    assert torch.equal(M.slerp(d, T([1.0, 1.0]), base, t=0.0), d[0])
    assert torch.equal(M.slerp(d, T([1.0, 1.0]), base, t=1.0), d[1])
    with pytest.raises(RecipeError):
        M.slerp(torch.randn(3, 4), torch.ones(3), torch.zeros(4))


# --------------------------------------------------------------------------------------------
# TIES family, magnitude pruning
# --------------------------------------------------------------------------------------------


def test_ties_by_hand_paper_variant():
    # Election on the unweighted τ̂ ("total"): Σ τ̂ = [6, -1, 3, 3, -7, -4] → γ = [+, -, +, +, -, -].
    # Agreeing entries: pos0 τ̂1=4, τ̂3=2 | pos1 τ̂1=-3 | pos2 τ̂2=3 | pos3 τ̂3=3 | pos4 τ̂1=-2, τ̂2=-5 | pos5 τ̂3=-4
    w = T([1.0, 1.0, 1.0])
    close(M.ties(TIES_DELTAS, w, zeros_base(6), density=0.5), [3.0, -3.0, 3.0, 3.0, -3.5, -4.0])
    # weights [1, 2, 0.5] applied after the election, divided by the count of agreeing tasks:
    # pos0 (4 + 0.5·2)/2 = 2.5 | -3 | 2·3 = 6 | 0.5·3 = 1.5 | (-2 + 2·-5)/2 = -6 | 0.5·-4 = -2;  λ = 0.5
    got = M.ties(TIES_DELTAS, T([1.0, 2.0, 0.5]), zeros_base(6), density=0.5, lambda_=0.5)
    close(got, [1.25, -1.5, 3.0, 0.75, -3.0, -1.0])
    # normalize=False: plain sum of the agreeing weighted entries: [5, -3, 6, 1.5, -12, -2]
    got = M.ties(TIES_DELTAS, T([1.0, 2.0, 0.5]), zeros_base(6), density=0.5, normalize=False)
    close(got, [5.0, -3.0, 6.0, 1.5, -12.0, -2.0])


def test_ties_frequency_election_ties_go_positive():
    # Σ sign τ̂ = [2, 0, 1, 1, -2, -1]; pos1 is a tie → +1, so τ̂2 = +2 is kept there.
    got = M.ties(TIES_DELTAS, torch.ones(3), zeros_base(6), density=0.5, majority_sign_method="frequency")
    close(got, [3.0, 2.0, 3.0, 3.0, -3.5, -4.0])


def test_ties_weighted_election_mergekit_variant():
    # x_i = w_i τ̂_i with w = [1, 2, 0.5]: x1 = [4,-3,0,0,-2,0], x2 = [0,4,6,0,-10,0], x3 = [1,0,0,1.5,0,-2]
    # Σ x = [5, 1, 6, 1.5, -12, -2] → γ = [+, +, +, +, -, -] (pos1 flips compared with the paper variant)
    # Σ agreeing x / Σ agreeing w: [(4+1)/1.5, 4/2, 6/2, 1.5/0.5, -12/3, -2/0.5]
    got = M.ties(TIES_DELTAS, T([1.0, 2.0, 0.5]), zeros_base(6), density=0.5, weighted_election=True)
    close(got, [10 / 3, 2.0, 3.0, 3.0, -4.0, -4.0])


def test_ties_density_one_agreeing_signs_is_the_mean():
    d = T([[1.0, -2.0, 3.0], [3.0, -4.0, 1.0]])
    close(M.ties(d, torch.ones(2), zeros_base(3), density=1.0), [2.0, -3.0, 2.0])


def test_ties_global_thresholds_keep_at_least_the_threshold():
    # thresholds [2, 2, 2]: |τ| >= 2 keeps τ1 → [4,-3,0,0,-2,0] (the 2 is kept: >=),
    # τ2 → [0,2,3,0,-5,0], τ3 → [2,0,0,3,0,-4]: the same τ̂ as density 0.5 here.
    got = M.ties(TIES_DELTAS, torch.ones(3), zeros_base(6), thresholds=T([2.0, 2.0, 2.0]))
    close(got, [3.0, -3.0, 3.0, 3.0, -3.5, -4.0])
    torch.manual_seed(5)
    d = torch.randn(3, 10, 9)
    thr = torch.stack([M.trim_threshold(d[i], 18) for i in range(3)])  # k = int(0.2·90) = 18
    w = T([0.3, 1.0, -0.7])
    assert torch.equal(M.ties(d, w, zeros_base((10, 9)), thresholds=thr), M.ties(d, w, zeros_base((10, 9))))


def test_magnitude_prune_by_hand():
    # τ̂1 = [4,-3,0,0,-2,0], τ̂2 = [0,2,3,0,-5,0]; 1·τ̂1 + 2·τ̂2 = [4, 1, 6, 0, -12, 0]
    got = M.magnitude_prune(TIES_DELTAS[:2], T([1.0, 2.0]), zeros_base(6), density=0.5)
    close(got, [4.0, 1.0, 6.0, 0.0, -12.0, 0.0])


def test_per_task_density():
    # τ1 with density 0.5 → [4,-3,0,0,-2,0]; τ2 with density 1/6 → k = 1 → [0,0,0,0,-5,0]
    got = M.magnitude_prune(TIES_DELTAS[:2], torch.ones(2), zeros_base(6), density=[0.5, 1 / 6])
    close(got, [4.0, -3.0, 0.0, 0.0, -7.0, 0.0])
    with pytest.raises(RecipeError):
        M.magnitude_prune(TIES_DELTAS[:2], torch.ones(2), zeros_base(6), density=[0.5, 0.5, 0.5])


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_ties_and_magnitude_prune_match_peft(sign_method):
    from peft.utils import merge_utils as peft

    torch.manual_seed(6)
    d = torch.randn(3, 16, 12)
    w = T([0.7, 1.3, -0.4])
    got = M.ties(d, w, zeros_base((16, 12)), density=0.3, majority_sign_method=sign_method)
    want = peft.ties(list(d), w, 0.3, sign_method)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    got = M.magnitude_prune(d, w, zeros_base((16, 12)), density=0.3)
    torch.testing.assert_close(got, peft.magnitude_prune(list(d), w, 0.3), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# DARE
# --------------------------------------------------------------------------------------------


def test_dare_density_one_is_task_arithmetic():
    torch.manual_seed(7)
    d, w = torch.randn(3, 8, 5), T([0.5, -1.0, 2.0])
    want = M.task_arithmetic(d, w, zeros_base((8, 5)), lambda_=0.7)
    got = M.dare_linear(d, w, zeros_base((8, 5)), density=1.0, lambda_=0.7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, want)
    # dare_ties at density 1 = TIES at density 1
    got = M.dare_ties(d, w, zeros_base((8, 5)), density=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, M.ties(d, w, zeros_base((8, 5)), density=1.0))


def test_dare_survivors_are_rescaled_by_inverse_density():
    tau = torch.full((1, 2000), 0.3)
    out = M.dare_linear(tau, T([1.0]), zeros_base(2000), density=0.25, generator=torch.Generator().manual_seed(1))
    kept = out != 0
    close(out[kept], torch.full((int(kept.sum()),), 1.2))  # 0.3 / 0.25
    assert 0.2 < kept.float().mean() < 0.3  # ≈ density
    # rescale_method="l1": survivors scaled so that ‖out‖₁ = ‖τ‖₁ = 600
    out = M.dare_linear(
        tau, T([1.0]), zeros_base(2000), density=0.25, rescale_method="l1", generator=torch.Generator().manual_seed(1)
    )
    assert abs(float(out.abs().sum()) - 600.0) < 1e-2
    out = M.dare_linear(tau, T([1.0]), zeros_base(2000), density=0.25, rescale=False, generator=torch.Generator().manual_seed(1))
    assert torch.all((out == 0) | (out == tau))  # survivors keep their value


def test_dare_matches_peft_with_the_same_seed():
    from peft.utils import merge_utils as peft

    torch.manual_seed(8)
    d, w = torch.randn(3, 20, 7), T([1.0, 0.5, -0.8])
    torch.manual_seed(123)
    want = peft.dare_linear(list(d), w, 0.4)
    got = M.dare_linear(d, w, zeros_base((20, 7)), density=0.4, rng="torch", generator=torch.Generator().manual_seed(123))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.manual_seed(321)
    want = peft.dare_ties(list(d), w, 0.4, "total")
    got = M.dare_ties(d, w, zeros_base((20, 7)), density=0.4, rng="torch", generator=torch.Generator().manual_seed(321))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_stochastic_methods_are_deterministic_by_seed(name):
    fn = M.METHODS[name].fn
    torch.manual_seed(9)
    d, w, base = torch.randn(3, 30, 20), T([1.0, 0.5, 2.0]), torch.randn(30, 20)
    a = fn(d, w, base, generator=torch.Generator().manual_seed(11))
    b = fn(d, w, base, generator=torch.Generator().manual_seed(11))
    c = fn(d, w, base, generator=torch.Generator().manual_seed(12))
    assert a.numpy().tobytes() == b.numpy().tobytes()
    assert not torch.equal(a, c)


# --------------------------------------------------------------------------------------------
# DELLA
# --------------------------------------------------------------------------------------------


def test_della_keep_probabilities_follow_magnitude_ranks():
    # One row τ = [0.1, -0.5, 0.3, 0.2, -0.4], density 0.5, ε = 0.5:
    # ranks by |τ| (0-based) = [0, 4, 2, 1, 3] → rank_norm = rank/4 = [0, 1, 0.5, 0.25, 0.75]
    # p = (0.5 − 0.5) + rank_norm·1 = [0, 1, 0.5, 0.25, 0.75]; survivors τ/p = [-, -0.5, 0.6, 0.8, -0.5333]
    row = T([0.1, -0.5, 0.3, 0.2, -0.4])
    tau = row.repeat(20000, 1).unsqueeze(0)  # 20000 identical rows
    out = M.della_linear(tau, T([1.0]), zeros_base((20000, 5)), density=0.5, epsilon=0.5,
                         generator=torch.Generator().manual_seed(2))
    kept = (out != 0).float().mean(0)
    torch.testing.assert_close(kept, T([0.0, 1.0, 0.5, 0.25, 0.75]), atol=0.015, rtol=0)
    for j, value in enumerate([0.0, -0.5, 0.6, 0.8, -0.4 / 0.75]):
        col = out[:, j]
        assert torch.all((col == 0) | torch.isclose(col, torch.tensor(value)))
    # unbiased wherever p > 0: the column means ≈ τ (column 0 has p = 0 and is always dropped)
    torch.testing.assert_close(out.mean(0)[1:], row[1:], atol=0.02, rtol=0)


def test_della_l1_rescale_and_limits():
    torch.manual_seed(10)
    d = torch.randn(1, 40, 30)
    out = M.della_linear(d, T([1.0]), zeros_base((40, 30)), density=0.4, epsilon=0.1, rescale_method="l1",
                         generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out.abs().sum(), d.abs().sum(), rtol=1e-5, atol=0)
    # ε = 0 and density 1: nothing dropped → della = TIES at density 1, della_linear = TA
    d3, w = torch.randn(3, 6, 4), T([1.0, 2.0, 0.5])
    g = torch.Generator().manual_seed(0)
    assert torch.equal(M.della(d3, w, zeros_base((6, 4)), density=1.0, epsilon=0.0, generator=g),
                       M.ties(d3, w, zeros_base((6, 4)), density=1.0))
    assert torch.equal(M.della_linear(d3, w, zeros_base((6, 4)), density=1.0, epsilon=0.0, generator=g),
                       M.task_arithmetic(d3, w, zeros_base((6, 4))))
    with pytest.raises(RecipeError):
        M.della(d3, w, zeros_base((6, 4)), density=0.2, epsilon=0.3, generator=g)


# --------------------------------------------------------------------------------------------
# Breadcrumbs
# --------------------------------------------------------------------------------------------

# τ1 sorted by magnitude: 0.1(0) 0.2(5) 0.3(3) 0.4(7) 0.5(2) 0.6(8) 0.7(4) 0.8(9) 0.9(1) 1.0(6)
BC1 = T([0.1, -0.9, 0.5, 0.3, -0.7, 0.2, 1.0, -0.4, 0.6, 0.8])
# τ2 sorted by magnitude: 0.1(3) 0.2(0) 0.3(1) 0.4(6) 0.5(4) 0.6(5) 0.7(8) 0.8(9) 0.9(7) 1.0(2)
BC2 = T([0.2, 0.3, -1.0, 0.1, 0.5, -0.6, 0.4, 0.9, -0.7, 0.8])


def test_breadcrumbs_index_arithmetic_by_hand():
    one = T([1.0])
    # n = 10, density 0.5, γ 0.1: target 5, n_top 1, n_bot 4 → drop 0.1..0.4 and 1.0
    close(M.breadcrumbs(BC1[None], one, zeros_base(10), density=0.5, gamma=0.1),
          [0.0, -0.9, 0.5, 0.0, -0.7, 0.0, 0.0, 0.0, 0.6, 0.8])
    # density 0.95, γ 0.2: target 9, n_top 2, n_bot = -1 → n_top 1, n_bot 0: drop only 1.0
    close(M.breadcrumbs(BC1[None], one, zeros_base(10), density=0.95, gamma=0.2),
          [0.1, -0.9, 0.5, 0.3, -0.7, 0.2, 0.0, -0.4, 0.6, 0.8])
    # γ 0.01 → n_top = 0: keep the top 5 (mergekit's [n_bot:-0] slice would drop everything)
    close(M.breadcrumbs(BC1[None], one, zeros_base(10), density=0.5, gamma=0.01),
          [0.0, -0.9, 0.0, 0.0, -0.7, 0.0, 1.0, 0.0, 0.6, 0.8])
    # density 1: untouched
    assert torch.equal(M.breadcrumbs(BC1[None], one, zeros_base(10), density=1.0), BC1)


def test_breadcrumbs_and_breadcrumbs_ties_two_tasks_by_hand():
    d = torch.stack([BC1, BC2])
    # τ̃1 = [0, -0.9, 0.5, 0, -0.7, 0, 0, 0, 0.6, 0.8]; τ̃2 = [0, 0, 0, 0, 0.5, -0.6, 0, 0.9, -0.7, 0.8]
    close(M.breadcrumbs(d, torch.ones(2), zeros_base(10), density=0.5, gamma=0.1),
          [0.0, -0.9, 0.5, 0.0, -0.2, -0.6, 0.0, 0.9, -0.1, 1.6])
    # Σ = [0, -0.9, 0.5, 0, -0.2, -0.6, 0, 0.9, -0.1, 1.6] → γ = [+,-,+,+,-,-,+,+,-,+]
    # pos4 keeps τ̃1 = -0.7, pos8 keeps τ̃2 = -0.7, pos9 (0.8 + 0.8)/2
    close(M.breadcrumbs_ties(d, torch.ones(2), zeros_base(10), density=0.5, gamma=0.1),
          [0.0, -0.9, 0.5, 0.0, -0.7, -0.6, 0.0, 0.9, -0.7, 0.8])
    # global thresholds (lower, upper): keep 0.45 <= |τ| < 0.95 → the same masks as above
    thr = T([[0.45, 0.95], [0.45, 0.95]])
    close(M.breadcrumbs(d, torch.ones(2), zeros_base(10), thresholds=thr),
          [0.0, -0.9, 0.5, 0.0, -0.2, -0.6, 0.0, 0.9, -0.1, 1.6])


# --------------------------------------------------------------------------------------------
# Model Stock
# --------------------------------------------------------------------------------------------


def test_model_stock_by_hand():
    w2 = torch.ones(2)
    # orthogonal: cos = 0 → t = 0 → θ0
    close(M.model_stock(T([[1.0, 0.0], [0.0, 1.0]]), w2, zeros_base(2)), [0.0, 0.0])
    # τ1 = [1, 0], τ2 = [1, 1]: cos = 1/√2, t = 2c/(1 + c) = 2(√2 − 1) = 0.8284271; mean τ = [1, 0.5]
    close(M.model_stock(T([[1.0, 0.0], [1.0, 1.0]]), w2, zeros_base(2)), [0.8284271, 0.4142136])
    # N = 3: cos12 = 0, cos13 = cos23 = 1/√2 → c = √2/3 = 0.4714045; t = 3c/(1 + 2c) = 0.7279221
    # mean τ = [2/3, 2/3, 0] → [0.4852814, 0.4852814, 0]
    d3 = T([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    close(M.model_stock(d3, torch.ones(3), zeros_base(3)), [0.4852814, 0.4852814, 0.0])
    # filter_wise: one t per row → row 0 orthogonal (0), row 1 as the 2-task case above
    d = T([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 1.0]]])
    close(M.model_stock(d, w2, zeros_base((2, 2)), filter_wise=True), [[0.0, 0.0], [0.8284271, 0.4142136]])
    with pytest.raises(RecipeError):
        M.model_stock(d[:1], torch.ones(1), zeros_base((2, 2)))


def test_model_stock_identical_finetunes_give_that_finetune():
    tau = torch.randn(4, 5)
    d = tau.expand(3, 4, 5).clone()
    torch.testing.assert_close(M.model_stock(d, torch.ones(3), torch.randn(4, 5)), tau, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# TSV, Iso-C, Iso-CTS
# --------------------------------------------------------------------------------------------


def test_tsv_single_full_rank_task_is_tau():
    torch.manual_seed(11)
    tau = torch.randn(1, 6, 4)
    torch.testing.assert_close(M.tsv(tau, T([1.0]), zeros_base((6, 4))), tau[0], atol=1e-5, rtol=1e-5)


def test_tsv_by_hand():
    # τ1 = diag(3, 1), τ2 = diag(0, -2); k = 2 // 2 = 1: (3, e1, e1) and (2, ±e2, ∓e2).
    # Û, V̂ are already orthonormal → τ = diag(3, -2)
    d = T([[[3.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, -2.0]]])
    close(M.tsv(d, torch.ones(2), zeros_base((2, 2))), [[3.0, 0.0], [0.0, -2.0]], atol=1e-6)
    close(M.tsv(d, torch.ones(2), zeros_base((2, 2)), alpha=0.5), [[1.5, 0.0], [0.0, -1.0]], atol=1e-6)
    # non-2-D: mean; τ1 = [1, 2], τ2 = [3, 0] → [2, 1]
    close(M.tsv(T([[1.0, 2.0], [3.0, 0.0]]), torch.ones(2), zeros_base(2)), [2.0, 1.0])


def test_tsv_decorrelates_with_the_polar_factor_formula():
    # τ1 = 3·e1 e1ᵀ, τ2 = 2·u vᵀ with u = (e1 + e2)/√2, v = e2 (k = 1 each):
    # Û = [e1, u], V̂ᵀ = [e1ᵀ; e2ᵀ] = I; U⊥ = Û (ÛᵀÛ)^(-1/2) (methods.md), τ = U⊥ diag(3, 2).
    u = T([1.0, 1.0]) / math.sqrt(2)
    d = torch.stack([3 * torch.outer(T([1.0, 0.0]), T([1.0, 0.0])), 2 * torch.outer(u, T([0.0, 1.0]))])
    u_hat = torch.stack([T([1.0, 0.0]), u], dim=1).double()
    evals, evecs = torch.linalg.eigh(u_hat.T @ u_hat)
    u_perp = u_hat @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    want = (u_perp @ torch.diag(T([3.0, 2.0]).double())).float()
    torch.testing.assert_close(M.tsv(d, torch.ones(2), zeros_base((2, 2))), want, atol=1e-5, rtol=1e-5)
    assert torch.allclose(u_perp.T @ u_perp, torch.eye(2, dtype=torch.float64))


def test_iso_c_by_hand_and_flat_spectrum():
    # M = diag(3, 0) + diag(0, 1) = diag(3, 1); mean(S) = 2 → τ = 2·I
    d = T([[[3.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]])
    close(M.iso_c(d, torch.ones(2), zeros_base((2, 2))), [[2.0, 0.0], [0.0, 2.0]])
    close(M.iso_c(d, torch.ones(2), zeros_base((2, 2)), alpha=0.5), [[1.0, 0.0], [0.0, 1.0]])
    torch.manual_seed(12)
    d = torch.randn(3, 7, 5)
    out = M.iso_c(d, torch.ones(3), zeros_base((7, 5)))
    s_out = torch.linalg.svdvals(out)
    s_sum = torch.linalg.svdvals(d.sum(0))
    torch.testing.assert_close(s_out, torch.full((5,), float(s_sum.mean())), atol=1e-5, rtol=1e-5)
    close(M.iso_c(T([[1.0, 2.0], [3.0, 0.0]]), torch.ones(2), zeros_base(2)), [2.0, 1.0])  # 1-D: mean


def test_iso_cts_by_hand():
    # 3×3, T = 2, f = 0.34: int(3·0.34) = 1; per task round((3 − 1)/2) = 1; common k_c = 1.
    # τ1 = diag(5, 1, 0), τ2 = diag(0, 0.5, 2): Σ = diag(5, 1.5, 2) → common = e1 (σ 5).
    # τ1 − proj = diag(0, 1, 0) → (1, e2); τ2 − proj = diag(0, 0.5, 2) → (2, e3).
    # S = [1, 2, 5] → mean 8/3; U = V = [e2, e3, e1] → τ = (8/3)·I.  (Iso-C: mean(5, 2, 1.5) = 17/6.)
    d = torch.stack([torch.diag(T([5.0, 1.0, 0.0])), torch.diag(T([0.0, 0.5, 2.0]))])
    got = M.iso_cts(d, torch.ones(2), zeros_base((3, 3)), common_space_fraction=0.34)
    close(got, torch.eye(3) * 8 / 3, atol=1e-5)
    close(M.iso_c(d, torch.ones(2), zeros_base((3, 3))), torch.eye(3) * 17 / 6, atol=1e-5)
    # flat spectrum on random input, and 1-D → mean
    torch.manual_seed(13)
    r = torch.randn(3, 9, 6)
    s = torch.linalg.svdvals(M.iso_cts(r, torch.ones(3), zeros_base((9, 6))))
    torch.testing.assert_close(s, torch.full_like(s, float(s.mean())), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Consensus (TALL masks), PCB
# --------------------------------------------------------------------------------------------


def test_consensus_by_hand():
    d = T([[1.0, 0.1, -2.0, 0.5], [1.0, -1.0, 0.5, 0.0], [-0.2, 0.1, -2.0, 0.0]])
    w, base = torch.ones(3), zeros_base(4)
    # τ_MTL = [1.8, -0.8, -3.5, 0.5]
    # m1: |τ1| = [1, .1, 2, .5] >= 0.4·|τ_MTL − τ1| = 0.4·[.8, .9, 1.5, 0] = [.32, .36, .6, 0] → [1, 0, 1, 1]
    # m2: |τ2| = [1, 1, .5, 0]  >= 0.4·[.8, .2, 4, .5] = [.32, .08, 1.6, .2]             → [1, 1, 0, 0]
    # m3: |τ3| = [.2, .1, 2, 0] >= 0.4·[2, .9, 1.5, .5] = [.8, .36, .6, .2]              → [0, 0, 1, 0]
    # votes = [2, 1, 2, 1]
    close(M.consensus(d, w, base), [1.8, 0.0, -3.5, 0.0])
    close(M.consensus(d, w, base, k=1), [1.8, -0.8, -3.5, 0.5])
    close(M.consensus(d, w, base, k=0), [1.8, -0.8, -3.5, 0.5])  # plain TA
    close(M.consensus(d, w, base, k=3), [0.0, 0.0, 0.0, 0.0])
    close(M.consensus(d, w, base, alpha=0.5), [0.9, 0.0, -1.75, 0.0])
    # per-task λ = [0.4, 0.4, 0.05]: m3 = |τ3| >= 0.05·[2, .9, 1.5, .5] = [.1, .045, .075, .025] → [1, 1, 1, 0]
    # votes = [3, 2, 2, 1] → position 1 is now kept
    close(M.consensus(d, w, base, lambdas=[0.4, 0.4, 0.05]), [1.8, -0.8, -3.5, 0.0])
    # λ1 = 2: m1 = [1 >= 1.6, .1 >= 1.8, 2 >= 3, .5 >= 0] = [0, 0, 0, 1] → votes [1, 1, 1, 1] → nothing
    close(M.consensus(d, w, base, lambdas=[2.0, 0.4, 0.4]), [0.0, 0.0, 0.0, 0.0])


def test_pcb_by_hand():
    # d = 4, T = 2, clip_ratio 0 (no clipping), n = 2, ratio 0.75 → thr = sorted(β)[int(4·0.25)] = 2nd smallest
    # τ1 = [1, -2, 0.5, 0]: minmax|τ1| = [.5, 1, .25, 0] → intra1 = exp(2·x²) = [e^.5, e^2, e^.125, 1]
    # τ2 = [.5, 1, -1, 2]:  minmax|τ2| = [0, 1/3, 1/3, 1] → intra2 = [1, e^(2/9), e^(2/9), e^2]
    # Στ = [1.5, -1, -.5, 2] → inter1 = tanh([1.5, 2, -.25, 0]), inter2 = tanh([.75, -1, .5, 4])
    # β1 = [1.4923372, 7.1232539, -0.2775292, 0];  β2 = [0.6351490, -0.9511160, 0.5771145, 7.3841003]
    # scale1: thr 0, max 7.1232539 → [0.2095022, 1, 0, 0]
    # scale2: thr 0.5771145, max 7.3841003 → [0.0085257, 0, 0, 1]
    # τ = Σ w_i scale_i τ_i / Σ scale_i → pos0 (0.2095022·1 + 0.0085257·0.5)/0.2180279 = 0.9804481
    d = T([[1.0, -2.0, 0.5, 0.0], [0.5, 1.0, -1.0, 2.0]])
    got = M.pcb(d, torch.ones(2), zeros_base(4), ratio=0.75, clip_ratio=0.0)
    close(got, [0.9804481, -2.0, 0.0, 2.0], atol=1e-5)
    # weights multiply the task vectors (the official per-task λ): w = [2, 1] → pos0 1.9413443, pos1 -4
    got = M.pcb(d, T([2.0, 1.0]), zeros_base(4), ratio=0.75, clip_ratio=0.0, lambda_=0.5)
    close(got, [0.9706721, -2.0, 0.0, 1.0], atol=1e-5)


def test_pcb_degenerate_rows_stay_finite():
    # all-equal magnitudes and a tiny tensor: the official code would produce 0/0 = NaN here
    d = T([[1.0, 1.0, 1.0, 1.0, 1.0], [2.0, -2.0, 2.0, -2.0, 2.0]])
    assert torch.isfinite(M.pcb(d, torch.ones(2), zeros_base(5))).all()
    assert torch.isfinite(M.pcb(T([[0.5], [0.25]]), torch.ones(2), zeros_base(1))).all()


# --------------------------------------------------------------------------------------------
# Hierarchical: layer weight, interpolation, head alignment
# --------------------------------------------------------------------------------------------


def test_hierarchical_by_hand():
    # layer = two tensors; Δ_A = ([1, 0], [1]), Δ_B = ([1, 1], [0]) → concatenated [1,0,1]·[1,1,0] = 1,
    # norms √2·√2 → cos = 0.5 = w_l; τ = 0.5·Δ_A + 0.5·Δ_B
    layer = [T([[1.0, 0.0], [1.0, 1.0]]), T([[1.0], [0.0]])]
    assert M.hierarchical_weight([t[0] for t in layer], [t[1] for t in layer]) == pytest.approx(0.5)
    out = M.hierarchical(layer)
    close(out[0], [1.0, 0.5])
    close(out[1], [0.5])
    # opposed deltas: cos = -1 → w_l = 0 → model A's layer
    out = M.hierarchical([T([[1.0, 2.0], [-1.0, -2.0]])])
    close(out[0], [1.0, 2.0])
    # identical deltas: w_l = 1 → B (= A)
    close(M.hierarchical([T([[3.0, -1.0], [3.0, -1.0]])])[0], [3.0, -1.0])
    with pytest.raises(RecipeError):
        M.hierarchical([torch.ones(3, 2)])


def _attention(x, q, k, v, o, num_heads, num_kv):
    """Plain multi-head attention with grouped keys/values (no RoPE, no mask)."""
    length = x.shape[0]
    hd = q.shape[0] // num_heads
    qh = (x @ q.T).view(length, num_heads, hd).transpose(0, 1)
    kh = (x @ k.T).view(length, num_kv, hd).transpose(0, 1).repeat_interleave(num_heads // num_kv, 0)
    vh = (x @ v.T).view(length, num_kv, hd).transpose(0, 1).repeat_interleave(num_heads // num_kv, 0)
    att = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(hd), dim=-1) @ vh
    return att.transpose(0, 1).reshape(length, -1) @ o.T


def test_permute_heads_by_hand():
    q = torch.arange(12.0).view(6, 2)  # 3 heads of 2 rows
    got = M.permute_heads(q, T([2, 0, 1]), 3, dim=0)
    assert got[:, 0].tolist() == [8.0, 10.0, 0.0, 2.0, 4.0, 6.0]  # new head 0 = old head 2, …
    o = torch.arange(12.0).view(2, 6)
    assert M.permute_heads(o, T([2, 0, 1]), 3, dim=1)[0].tolist() == [4.0, 5.0, 0.0, 1.0, 2.0, 3.0]
    assert M.group_permutation(T([3, 2, 0, 1]), 4, 2).tolist() == [1, 0]


@pytest.mark.parametrize("num_heads,num_kv,sigma", [(4, 4, [2, 0, 3, 1]), (4, 2, [2, 3, 1, 0]), (6, 2, [4, 5, 3, 1, 0, 2])])
def test_align_heads_recovers_a_permutation_and_preserves_function(num_heads, num_kv, sigma):
    gen = torch.Generator().manual_seed(14)
    hidden, hd = 8, 3
    qa, oa = torch.randn(num_heads * hd, hidden, generator=gen), torch.randn(hidden, num_heads * hd, generator=gen)
    ka, va = torch.randn(num_kv * hd, hidden, generator=gen), torch.randn(num_kv * hd, hidden, generator=gen)
    # model B = model A with heads shuffled (B head j = A head σ[j]) plus a little noise
    sig = T(sigma)
    kv_sig = M.group_permutation(sig, num_heads, num_kv)
    noise = lambda t: t + 0.01 * torch.randn(t.shape, generator=gen)  # noqa: E731
    qb, ob = noise(M.permute_heads(qa, sig, num_heads, 0)), noise(M.permute_heads(oa, sig, num_heads, 1))
    kb, vb = noise(M.permute_heads(ka, kv_sig, num_kv, 0)), noise(M.permute_heads(va, kv_sig, num_kv, 0))
    perm = M.align_heads(qa, qb, num_heads, k_a=ka, k_b=kb, v_a=va, v_b=vb, o_a=oa, o_b=ob, num_kv_heads=num_kv)
    # the inverse of σ: aligned B head i = B head perm[i] = A head i
    assert [sigma[p] for p in perm.tolist()] == list(range(num_heads))
    kv_perm = M.group_permutation(perm, num_heads, num_kv)
    aligned = (
        M.permute_heads(qb, perm, num_heads, 0), M.permute_heads(kb, kv_perm, num_kv, 0),
        M.permute_heads(vb, kv_perm, num_kv, 0), M.permute_heads(ob, perm, num_heads, 1),
    )
    torch.testing.assert_close(aligned[0], qa, atol=0.05, rtol=0)
    x = torch.randn(5, hidden, generator=gen)
    torch.testing.assert_close(
        _attention(x, *aligned, num_heads, num_kv), _attention(x, qb, kb, vb, ob, num_heads, num_kv), atol=1e-5, rtol=1e-5
    )
