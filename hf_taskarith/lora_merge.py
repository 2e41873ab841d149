"""Merging LoRA adapters into ONE LoRA adapter from their factors: pure tensor functions, no IO.

Every function works on ONE target module and never materialises a dense ``out x in`` update.

Inputs: ``factors = [(A_1, B_1, c_1), ..., (A_n, B_n, c_n)]`` with ``A_i`` (r_i x in), ``B_i``
(out x r_i) and a float ``c_i = w_i · s_i`` (merge weight times the adapter's LoRA scaling
``s_i = lora_alpha/r``, rsLoRA ``lora_alpha/√r``, after ``rank_pattern``/``alpha_pattern``). The
update they describe is::

    ΔW = Σ_i c_i · B_i @ A_i            (out x in)

Ranks may differ between inputs; a negative ``c_i`` negates an adapter; ``r_i = 0`` is allowed.

Outputs: factors ``(A, B)`` with ``A`` (r x in), ``B`` (out x r) and **scaling 1**: ``ΔW ≈ B @ A``.
Write them with ``lora_alpha = r`` (PEFT's scaling alpha/r = 1; this is what
``adapter_io.adapter_config`` does and what PEFT's own ``add_weighted_adapter`` writes), or convert
them for any other alpha with :func:`to_peft_factors`.

Precision: float32 math (bfloat16/float16 inputs are upcast; float64 inputs keep float64); the
small core SVDs (at most Σr_i x Σr_i) run in float64. Outputs are in the compute dtype, on the
device of the first ``A``; the caller casts for storage.

Orientation (Conv1D / ``fan_in_fan_out``, embeddings): pass ``A`` and ``B`` exactly as PEFT stores
them (``lora_A.weight`` / ``lora_embedding_A`` is r x in, ``lora_B.weight`` / ``lora_embedding_B``
is out x r) and store the returned ``A``/``B`` the same way. The math is on ``B @ A``; PEFT
transposes it onto the base weight itself for GPT-2 ``Conv1D`` (fan_in_fan_out: the stored weight is
in x out, ``ΔW_stored = s·(B@A)ᵀ``) and for embeddings (``ΔE = s·(B@A)ᵀ``, vocab x dim). A
transpose commutes with every function here, so nothing changes for those modules; only a caller
that builds dense references must transpose them.

Functions:

* :func:`merge_exact` — concatenation, rank Σr_i, exact (PEFT ``combination_type="cat"``);
* :func:`merge_svd` — best rank-r (Eckart–Young) approximation from QR factors, fixed rank or energy;
* :func:`knots_merge` — KnOTS (arXiv 2410.19735): align the adapters in the SVD basis of their
  concatenated updates, merge the per-task coefficient blocks with a :data:`methods.METHODS` method;
* :func:`knots_basis` — the KnOTS basis U and coefficient blocks Z_i alone;
* :func:`energy_rank`, :func:`to_peft_factors` — helpers.

Formulas: ``shared/methods.md`` ("LoRA task vectors").
"""

from __future__ import annotations

import math
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .errors import IncompatibleTensorsError, RecipeError

__all__ = [
    "Factors",
    "SvdMerge",
    "KnotsMerge",
    "merge_exact",
    "merge_svd",
    "knots_merge",
    "knots_basis",
    "energy_rank",
    "to_peft_factors",
]

Factors = Sequence[Tuple[torch.Tensor, torch.Tensor, float]]

# Singular values at or below RTOL_FACTOR · eps(compute dtype) · ‖B_cat‖₂·‖A_cat‖₂ are rounding
# noise of the factored computation (backward error of Householder QR and the core product, with
# slack) and are treated as exactly zero. 64·eps32 ≈ 7.6e-6.
RTOL_FACTOR = 64.0


class SvdMerge(NamedTuple):
    """Result of :func:`merge_svd`: ``ΔW ≈ B @ A`` at scaling 1.

    Attributes:
        A: (rank x in).
        B: (out x rank).
        rank: Rank of the returned factors (0 when the update is zero: skip the module).
        singular_values: All min(Σr_i, out, in) singular values of the exact ΔW, descending, float64,
            with rounding noise (see ``rtol``) set to 0.
    """

    A: torch.Tensor
    B: torch.Tensor
    rank: int
    singular_values: torch.Tensor


class KnotsMerge(NamedTuple):
    """Result of :func:`knots_merge`: ``ΔW_merged = B @ A`` at scaling 1.

    Attributes:
        A: (rank x in): the merged coefficient block Z (or its truncated factor).
        B: (out x rank): the shared KnOTS basis U (orthonormal columns), or its truncated factor.
        rank: Rank of the returned factors.
        basis_singular_values: Singular values S of the concatenated updates [ΔW_1 … ΔW_n] for the
            kept basis directions, descending, float64.
    """

    A: torch.Tensor
    B: torch.Tensor
    rank: int
    basis_singular_values: torch.Tensor


# --------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------


def _prepare(factors: Factors) -> Tuple[List[torch.Tensor], List[torch.Tensor], torch.dtype, torch.device]:
    """Validate; return ([c_i·A_i], [B_i]) in the compute dtype on the first A's device."""
    factors = list(factors)
    if not factors:
        raise ValueError("lora_merge: no factors given (need at least one (A, B, coef) triple)")
    shape_in = shape_out = None
    dtype = torch.float32
    device = None
    for i, item in enumerate(factors):
        if len(item) != 3:
            raise ValueError(f"lora_merge: factor {i} must be an (A, B, coef) triple, got {len(item)} items")
        a, b, coef = item
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.dim() != 2 or b.dim() != 2:
            raise IncompatibleTensorsError(f"lora_merge: factor {i}: A and B must be 2-D tensors")
        if a.shape[0] != b.shape[1]:
            raise IncompatibleTensorsError(
                f"lora_merge: factor {i}: A {list(a.shape)} (r x in) and B {list(b.shape)} (out x r) ranks differ"
            )
        if shape_in is None:
            shape_in, shape_out, device = a.shape[1], b.shape[0], a.device
        elif (a.shape[1], b.shape[0]) != (shape_in, shape_out):
            raise IncompatibleTensorsError(
                f"lora_merge: factor {i} has ΔW shape {[b.shape[0], a.shape[1]]} but factor 0 has {[shape_out, shape_in]}"
            )
        if a.dtype == torch.float64 or b.dtype == torch.float64:
            dtype = torch.float64
        c = float(coef)
        if not math.isfinite(c):
            raise ValueError(f"lora_merge: factor {i}: coefficient {coef!r} is not finite")
    a_list = [a.to(device=device, dtype=dtype) * float(c) for a, _, c in factors]
    b_list = [b.to(device=device, dtype=dtype) for _, b, _ in factors]
    return a_list, b_list, dtype, device


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _spectral_norm_small(x: torch.Tensor) -> float:
    """‖x‖₂ of a small matrix (an R factor), in float64."""
    if x.numel() == 0:
        return 0.0
    return float(torch.linalg.matrix_norm(x.double(), ord=2))


def _check_rank_energy(rank: Optional[int], energy: Optional[float]) -> None:
    if rank is not None and (isinstance(rank, bool) or int(rank) != rank or rank < 0):
        raise RecipeError(f"parameter 'rank' must be an integer >= 0, got {rank!r}")
    if energy is not None and not (0.0 < float(energy) <= 1.0):
        raise RecipeError(f"parameter 'energy' must be in (0, 1], got {energy!r}")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r with Σ_{j<r} S_j² >= energy · Σ_j S_j² (S descending).

    The comparison is on the normalised cumulative energy with a 1e-12 tolerance (so ``energy=1``
    is not defeated by rounding in the cumulative sum), the same rule as
    :func:`hf_taskarith.extract_lora.energy_rank`. An all-zero spectrum gives 0.

    Raises:
        RecipeError: energy outside (0, 1].
    """
    _check_rank_energy(None, energy)
    power = singular_values.detach().double().reshape(-1).pow(2)
    total = float(power.sum())
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(power, 0) / total
    target = torch.tensor(float(energy) - 1e-12, dtype=torch.float64, device=cumulative.device)
    r = int(torch.searchsorted(cumulative, target)) + 1
    return min(r, power.numel())


def to_peft_factors(
    A: torch.Tensor, B: torch.Tensor, r: int, alpha: float, *, use_rslora: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rescale scaling-1 factors so that PEFT's scaling reproduces ``ΔW = B @ A`` exactly.

    PEFT computes ``ΔW = s · B' @ A'`` with ``s = alpha / r`` (``use_rslora``: ``alpha / √r``).
    The factor ``1/s`` is split symmetrically: ``A' = A / √|s|``, ``B' = sign(s) · B / √|s|``.
    With ``alpha == r`` (plain LoRA) the factors are returned unchanged.

    Args:
        A: (r x in) factor at scaling 1.
        B: (out x r) factor at scaling 1.
        r: The rank written to ``adapter_config.json`` (must equal ``A.shape[0]``, as PEFT checks).
        alpha: The ``lora_alpha`` written to the config.
        use_rslora: The config's ``use_rslora``.

    Raises:
        ValueError: r does not match the factors, r <= 0, or alpha is zero / not finite.
    """
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"to_peft_factors: A {list(A.shape)} and B {list(B.shape)} are not (r x in, out x r)")
    if int(r) != A.shape[0] or r <= 0:
        raise ValueError(f"to_peft_factors: r={r!r} but the factors have rank {A.shape[0]} (PEFT needs them equal, > 0)")
    alpha = float(alpha)
    if alpha == 0.0 or not math.isfinite(alpha):
        raise ValueError(f"to_peft_factors: lora_alpha must be finite and non-zero, got {alpha!r}")
    s = alpha / math.sqrt(r) if use_rslora else alpha / r
    if s == 1.0:
        return A, B
    root = math.sqrt(abs(s))
    return A / root, B * (math.copysign(1.0, s) / root)


# --------------------------------------------------------------------------------------------
# Exact concatenation
# --------------------------------------------------------------------------------------------


def merge_exact(factors: Factors) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact merge by concatenation: ``A = vstack(c_i·A_i)``, ``B = hstack(B_i)``.

    ``B @ A = Σ c_i B_i A_i`` exactly (rank Σr_i; mixed ranks fine). This is PEFT's
    ``add_weighted_adapter(combination_type="cat")`` (which folds ``weight·scaling`` into A too).

    Returns:
        (A, B): (Σr_i x in) and (out x Σr_i), scaling 1, compute dtype.
    """
    a_list, b_list, _, _ = _prepare(factors)
    return torch.cat(a_list, dim=0), torch.cat(b_list, dim=1)


# --------------------------------------------------------------------------------------------
# Best rank-r approximation from the factors
# --------------------------------------------------------------------------------------------


def _lowrank_svd(
    a_cat: torch.Tensor, b_cat: torch.Tensor, rtol: Optional[float]
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of ``b_cat @ a_cat`` without forming it: returns (Q_B, U, S, Vh, Q_A).

    ``b_cat = Q_B R_B`` (out x k_b, k_b = min(out, R)), ``a_catᵀ = Q_A R_A`` (in x k_a,
    k_a = min(in, R)); ``b_cat a_cat = Q_B (R_B R_Aᵀ) Q_Aᵀ`` and the core ``R_B R_Aᵀ`` (k_b x k_a) is
    decomposed in float64: ``U S Vh``. So ``ΔW = (Q_B U) S (Q_A Vhᵀ)ᵀ`` with orthonormal columns on
    both sides, i.e. the thin SVD of ΔW. Singular values <= tol are zeroed (rounding noise).
    """
    dtype = a_cat.dtype
    q_b, r_b = torch.linalg.qr(b_cat, mode="reduced")
    q_a, r_a = torch.linalg.qr(a_cat.T, mode="reduced")
    core = r_b.double() @ r_a.double().T
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    scale = _spectral_norm_small(r_b) * _spectral_norm_small(r_a)  # = ‖B_cat‖₂·‖A_cat‖₂ >= ‖ΔW‖₂
    tol = (RTOL_FACTOR * _eps(dtype) if rtol is None else float(rtol)) * scale
    s = torch.where(s > tol, s, torch.zeros_like(s))
    return q_b, u, s, vh, q_a


def merge_svd(
    factors: Factors,
    rank: Optional[int] = None,
    energy: Optional[float] = None,
    *,
    rtol: Optional[float] = None,
) -> SvdMerge:
    """Best rank-r approximation (Eckart–Young) of ``ΔW = Σ c_i B_i A_i`` from the factors only.

    With ``B_cat = hstack(B_i)`` (out x R), ``A_cat = vstack(c_i A_i)`` (R x in), R = Σr_i:
    reduced QR ``B_cat = Q_B R_B`` and ``A_catᵀ = Q_A R_A``; the core ``C = R_B R_Aᵀ``
    (min(out,R) x min(in,R)) has the SVD ``U S Vᵀ`` (float64); then
    ``ΔW = (Q_B U) S (Q_A V)ᵀ`` is the SVD of ΔW and the top-r part is returned split
    symmetrically::

        B = Q_B U_r S_r^½      (out x r)         A = S_r^½ V_rᵀ Q_Aᵀ      (r x in)

    Cost O((out + in)·R² + R³); memory O((out + in)·R). Never forms an out x in matrix.

    Args:
        factors: ``[(A_i, B_i, c_i)]``, see the module docstring.
        rank: Output rank. Alone: exactly this rank (components beyond min(R, out, in) or below the
            noise floor are zero factors, so a fixed rank can always be written). With ``energy``:
            an upper bound on the energy rank.
        energy: In (0, 1]: the smallest r with Σ_{j<r} S_j² >= energy · Σ S_j² (per module, see
            :func:`energy_rank`).
        rtol: Singular values <= rtol·‖B_cat‖₂‖A_cat‖₂ count as zero (rounding noise of the factored
            computation). Default ``64·eps`` of the compute dtype.

    Neither ``rank`` nor ``energy``: the numerical rank (no information lost beyond rounding), so
    an update that cancels out (an adapter minus itself) gives rank 0.

    Returns:
        :class:`SvdMerge` ``(A, B, rank, singular_values)``; ``rank == 0`` means ΔW = 0 (the factors
        are then 0 x in and out x 0: skip the module).

    Raises:
        RecipeError: rank < 0 or energy outside (0, 1].
    """
    _check_rank_energy(rank, energy)
    a_list, b_list, dtype, device = _prepare(factors)
    a_cat, b_cat = torch.cat(a_list, dim=0), torch.cat(b_list, dim=1)
    n_out, n_in = b_cat.shape[0], a_cat.shape[1]
    if a_cat.shape[0] == 0:  # every input has rank 0
        s = torch.zeros(0, dtype=torch.float64, device=device)
        r = 0 if rank is None or energy is not None else int(rank)
        return SvdMerge(a_cat.new_zeros((r, n_in)), b_cat.new_zeros((n_out, r)), r, s)
    q_b, u, s, vh, q_a = _lowrank_svd(a_cat, b_cat, rtol)
    nonzero = int((s > 0).sum())
    if energy is not None:
        r = energy_rank(s, energy)
        if rank is not None:
            r = min(r, int(rank))
    elif rank is not None:
        r = int(rank)
    else:
        r = nonzero
    k = min(r, s.numel())
    root = s[:k].sqrt()
    b = q_b @ (u[:, :k] * root).to(dtype)
    a = (root[:, None] * vh[:k]).to(dtype) @ q_a.T
    if r > k:  # pad a requested fixed rank with zero components
        a = torch.cat([a, a.new_zeros((r - k, n_in))], dim=0)
        b = torch.cat([b, b.new_zeros((n_out, r - k))], dim=1)
    return SvdMerge(a, b, r, s)


# --------------------------------------------------------------------------------------------
# KnOTS
# --------------------------------------------------------------------------------------------


def knots_basis(
    factors: Factors, *, rtol: Optional[float] = None
) -> Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor]:
    """The KnOTS basis and per-task coefficient blocks, from the factors only.

    Returns ``(U, [Z_1 … Z_n], S)`` with ``U`` (out x k, orthonormal columns) the left singular
    vectors of ``M = [ΔW_1 … ΔW_n]`` (out x n·in) for its k non-negligible singular values ``S``
    (float64), and ``Z_i = Uᵀ ΔW_i = S V_iᵀ`` (k x in), so that ``ΔW_i = U Z_i``. See
    :func:`knots_merge` for the derivation. Directions with S <= rtol·‖B_cat‖₂·max_i‖c_i A_i‖₂
    (rounding noise; default rtol 64·eps) are dropped (KnOTS keeps only supported components).
    """
    a_list, b_list, dtype, device = _prepare(factors)
    b_cat = torch.cat(b_list, dim=1)
    n_out, n_in = b_cat.shape[0], a_list[0].shape[1]
    ranks = [a.shape[0] for a in a_list]
    if sum(ranks) == 0:
        empty = torch.zeros(0, dtype=torch.float64, device=device)
        return b_cat.new_zeros((n_out, 0)), [b_cat.new_zeros((0, n_in)) for _ in a_list], empty
    q_b, r_b = torch.linalg.qr(b_cat, mode="reduced")  # r_b: k_b x R
    r_b64 = r_b.double()
    blocks = []  # K = [R_B^(1) L_1ᵀ, …, R_B^(n) L_nᵀ]
    norm_d = 0.0  # ‖blockdiag(c_i A_i)‖₂ = max_i ‖L_i‖₂
    offsets = [0]
    for a, r in zip(a_list, ranks):
        offsets.append(offsets[-1] + r)
        if r == 0:
            continue
        l_i = torch.linalg.qr(a.T, mode="r").R.double()  # (c_i A_i)ᵀ = Q_i L_i, L_i: min(in, r_i) x r_i
        norm_d = max(norm_d, _spectral_norm_small(l_i))
        blocks.append(r_b64[:, offsets[-2]:offsets[-1]] @ l_i.T)
    k_mat = torch.cat(blocks, dim=1)
    u_k, s, _ = torch.linalg.svd(k_mat, full_matrices=False)
    tol = (RTOL_FACTOR * _eps(dtype) if rtol is None else float(rtol)) * _spectral_norm_small(r_b) * norm_d
    keep = s > tol
    u_k, s = u_k[:, keep], s[keep]
    u = q_b @ u_k.to(dtype)
    zs = []
    for i, a in enumerate(a_list):
        proj = (u_k.T @ r_b64[:, offsets[i]:offsets[i + 1]]).to(dtype)  # U_Kᵀ Q_Bᵀ B_i  (k x r_i)
        zs.append(proj @ a)
    return u, zs, s


def _method_kwargs(spec: Any, method_params: dict) -> dict:
    """Recipe defaults < given parameters; recipe names (``lambda``) or Python names (``lambda_``)."""
    from .methods import validate_params

    recipe_names = {("lambda" if k == "lambda_" else k): v for k, v in method_params.items()}
    validate_params(spec.name, recipe_names)
    merged = {**spec.defaults, **recipe_names}
    return {("lambda_" if k == "lambda" else k): v for k, v in merged.items()}


def knots_merge(
    factors: Factors,
    method: str = "ties",
    rank: Optional[int] = None,
    *,
    energy: Optional[float] = None,
    weights: Optional[Sequence[float]] = None,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    rtol: Optional[float] = None,
    **method_params: Any,
) -> KnotsMerge:
    """KnOTS: merge LoRA adapters in the SVD basis of their concatenated updates.

    Paper: "Model merging with SVD to tie the KnOTS", Stoica, Ramesh, Ecsedi, Choshen, Hoffman,
    ICLR 2025, arXiv:2410.19735. The thin SVD of the concatenated task updates
    ``M = [ΔW_1 … ΔW_n] = U S [V_1ᵀ … V_nᵀ]`` (out x n·in) gives a basis U shared by all tasks in
    which ``ΔW_i = U Z_i`` with the coefficient block ``Z_i = S V_iᵀ = Uᵀ ΔW_i`` (k x in). The blocks
    are merged with an ordinary merge method (TIES, DARE, TA, ...), ``Z = method({Z_i})``, and
    ``ΔW_merged = U Z`` — written as the LoRA factors ``A = Z``, ``B = U`` (rank k), optionally
    truncated to the best rank-r approximation.

    Factored computation (no dense ΔW_i, no out x n·in matrix): with ``ΔW_i = B_i (c_i A_i)``,
    ``M = B_cat · D``, ``D = blockdiag(c_1 A_1, …, c_n A_n)`` (R x n·in). Reduced QR
    ``B_cat = Q_B R_B`` (out x k_b, k_b x R) and, per task, ``(c_i A_i)ᵀ = Q_i L_i`` (in x r_i',
    r_i' x r_i). Then ``D = blockdiag(L_iᵀ) · blockdiag(Q_iᵀ)`` where ``blockdiag(Q_iᵀ)`` has
    orthonormal rows, so::

        M = Q_B · K · blockdiag(Q_iᵀ),   K = R_B · blockdiag(L_iᵀ) = [R_B^(1) L_1ᵀ … R_B^(n) L_nᵀ]

    (``R_B^(i)`` = the columns of R_B for task i = Q_Bᵀ B_i). K is small (k_b x Σr_i'); its SVD
    ``K = U_K S W_Kᵀ`` (float64) gives ``U = Q_B U_K`` and the singular values S of M. (This is the
    square root of the R x R Gram route ``K Kᵀ = R_B blockdiag(c_i² A_i A_iᵀ) R_Bᵀ``, without
    squaring the condition number.) The coefficient blocks are
    ``Z_i = Uᵀ ΔW_i = (U_Kᵀ R_B^(i)) (c_i A_i)`` — a (k x r_i)(r_i x in) product.
    Cost O((out + in)·R² + R³ + n·k·R·in); memory for the blocks n·k·in (k <= min(out, R)).

    The merge method is called like the dense engine calls it on one tensor:
    ``METHODS[method].fn(stack(Z_i), weights, zeros_like(Z_1), **params)``, params = the method's
    recipe defaults overridden by ``method_params``. Weights: by default ``c_i`` already carries
    ``w_i`` and ones are passed, so TIES elects signs on the weighted blocks and ``linear``
    (normalize) divides by n. To reproduce the dense engine's semantics of a method exactly (weights
    applied by the method, e.g. TIES' unweighted election or ``linear``'s Σw normalisation), pass
    ``c_i = s_i`` (scaling only) in ``factors`` and the merge weights in ``weights``.
    ``task_arithmetic`` without truncation reproduces Σ c_i B_i A_i exactly (U spans every ΔW_i).
    The merge is per module, as in the paper's per-layer SVD; top-k trimming counts the entries of
    the k x in blocks. Negative ``c_i`` negate a block before trimming/election.

    Args:
        factors: ``[(A_i, B_i, c_i)]`` (module docstring).
        method: A tensor-scope method name of :data:`hf_taskarith.methods.METHODS`.
        rank: Truncate ``U Z`` to its best rank-r approximation (balanced √S split). None: rank k.
        energy: Truncate to the smallest rank keeping this fraction of Σ S² of ``U Z`` (with
            ``rank`` as an upper bound), as :func:`merge_svd`.
        weights: Per-task weights passed to the method (default ones; see above).
        seed: Seed of the generator of a stochastic method (DARE, DELLA) when ``generator`` is None
            (default 0). Use a different seed per module for independent masks.
        generator: A :class:`torch.Generator` on the factors' device for stochastic methods.
        rtol: Noise threshold for basis directions (default 64·eps of the compute dtype).
        **method_params: Method parameters (recipe names; ``lambda`` or ``lambda_``).

    Returns:
        :class:`KnotsMerge` ``(A, B, rank, basis_singular_values)``.

    Raises:
        RecipeError: unknown or layer-scope method, bad parameters, wrong number of tasks, bad rank/energy.
    """
    from .methods import get_method

    _check_rank_energy(rank, energy)
    spec = get_method(method)
    if spec.scope != "tensor":
        raise RecipeError(f"method {method!r} merges whole layers and cannot be used with KnOTS (per-module)")
    factors = list(factors)
    n = len(factors)
    if n < spec.min_tasks or (spec.max_tasks is not None and n > spec.max_tasks):
        bound = f"{spec.min_tasks}" + ("" if spec.max_tasks is None else f"..{spec.max_tasks}")
        raise RecipeError(f"method {method!r} takes {bound} inputs, got {n}")
    kwargs = _method_kwargs(spec, method_params)
    u, zs, s = knots_basis(factors, rtol=rtol)
    dtype, device = u.dtype, u.device
    k, n_in = zs[0].shape
    if k == 0:  # every update is zero
        merged = zs[0]
    else:
        if weights is None:
            w = torch.ones(n, dtype=dtype, device=device)
        else:
            w = torch.as_tensor(weights, dtype=dtype, device=device).reshape(-1)
            if w.numel() != n:
                raise RecipeError(f"knots_merge: {n} adapters but {w.numel()} weights")
        if spec.stochastic:
            if generator is None:
                generator = torch.Generator(device=device)
                generator.manual_seed(0 if seed is None else int(seed))
            kwargs["generator"] = generator
        deltas = torch.stack(zs)
        del zs
        merged = spec.fn(deltas, w, torch.zeros_like(deltas[0]), **kwargs).to(dtype)
    if rank is None and energy is None:
        return KnotsMerge(merged, u, k, s)
    # U has orthonormal columns: the SVD of U Z is U·svd(Z); merge_svd handles it (QR of U is trivial).
    out = merge_svd([(merged, u, 1.0)], rank=rank, energy=energy, rtol=rtol)
    return KnotsMerge(out.A, out.B, out.rank, s)
