"""θ = θ_base + Σ c_i τ_i, evaluated per tensor on the streaming engine."""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch

from .checkpoint import TensorStore
from .engine import LazyTensor, StreamingMerge, add_scaled_, scale_into_
from .refs import ResolvedModel
from .task_vector import BaseModel, LeafTaskVector, LoraTaskVector, TaskVector


class MergedModel(StreamingMerge):
    """The lazy result of ``task_vector.apply_to(base)``.

    Call :meth:`save_pretrained` to stream it to disk, :meth:`to_model` for an in-memory
    transformers model, or :meth:`iter_tensors` to consume it tensor by tensor.

    Dense task vectors that share this base are folded algebraically: for
    ``θ0 + Σ c_i (θ_i − θ0)`` the engine computes ``(1 − Σ c_i)·θ0 + Σ c_i θ_i``, which reads each
    input once and makes ``base + 1.0·τ`` reproduce the finetune bit for bit in fp32.
    """

    def __init__(self, base: BaseModel, expression: TaskVector):
        super().__init__(base)
        self.expression = expression
        self.terms = expression.terms()

    def validate(self) -> None:
        for _, leaf in self.terms:
            leaf.bind(self.base.store, self.base.config)

    def inputs(self) -> List[ResolvedModel]:
        return [leaf.source for _, leaf in self.terms if leaf.source is not None]

    def describe(self) -> Dict[str, Any]:
        return {
            "method": "task_arithmetic",
            "base": self.base.resolved.display_name,
            "base_commit": self.base.resolved.commit_sha,
            "tasks": [
                {
                    "name": leaf.name,
                    "kind": "adapter" if isinstance(leaf, LoraTaskVector) else "model",
                    "commit": leaf.source.commit_sha if leaf.source else None,
                    "weight": coef,
                }
                for coef, leaf in self.terms
            ],
        }

    def compute(self, name: str, base: LazyTensor) -> torch.Tensor:
        return fold_linear(name, base, self.terms, self.base.store)


def fold_linear(
    name: str, base: LazyTensor, terms: List[Tuple[float, LeafTaskVector]], store: TensorStore
) -> torch.Tensor:
    """``θ0 + Σ c_i τ_i`` for one tensor, folding dense τ into ``(1 − Σc_i)·θ0 + Σ c_i θ_i``.

    Each input is read once and accumulated blockwise into one fp32 tensor, so the working set
    is the accumulator plus one input; the base is not read when its coefficient cancels.

    Args:
        name: The base tensor's name.
        base: The lazy base tensor (its device is where the math runs).
        terms: ``(c_i, τ_i)`` pairs.
        store: The base checkpoint (dense τ reading it are folded into the base coefficient).

    Returns:
        The merged tensor in fp32.
    """
    base_coef = 1.0
    reads = []
    for coef, leaf in terms:
        for mult, identity, load in leaf.linear_parts(name):
            if identity == store.identity:
                base_coef += coef * mult
            else:
                reads.append((coef * mult, load))
    nonlinear = [(c, leaf) for c, leaf in terms if leaf.needs_base_tensor(name, store)]
    device = base.device
    loaded = None
    if device.type == "cpu" and reads and not _has_nonlinear(terms, name, store):
        from . import kernels

        if kernels.available():  # one fused pass over the stored inputs (same bits as below)
            from .checkpoint import mapped_reads

            with mapped_reads():  # map, do not copy: the kernel reads each input once
                loaded = [(coef, load()) for coef, load in reads]
                if abs(base_coef) < 1e-12:  # θ0 cancels: the first input takes its place, as below
                    start = (loaded[0][1], loaded[0][0], loaded[1:])
                else:
                    start = (base.raw(), base_coef, loaded)
            out = kernels.fold(*start, base.out_dtype)
            if out is not None:
                return out
    if abs(base_coef) < 1e-12 and reads:
        # θ0 cancels (e.g. base + 1.0·τ): never read it. out= keeps one fp32 pass, no temporaries.
        coef, load = reads.pop(0)
        first = loaded.pop(0)[1] if loaded is not None else load()
        acc = torch.empty(base.shape, dtype=torch.float32, device=device)
        scale_into_(acc, first.to(device), coef)
    elif nonlinear:
        acc = base.get() * base_coef  # DoRA / saved modules need the untouched θ0 below
    else:
        acc = base.get()
        if base_coef != 1.0:
            acc.mul_(base_coef)
    for i, (coef, load) in enumerate(reads):
        x = loaded[i][1] if loaded is not None else load()
        add_scaled_(acc, x.to(device), coef)  # blockwise: no full-size fp32 copy of the input
    for coef, leaf in terms:
        leaf.add_nonlinear_(acc, name, coef, store, base.get() if nonlinear else None)
    return acc


def _has_nonlinear(terms: List[Tuple[float, LeafTaskVector]], name: str, store: TensorStore) -> bool:
    """Whether some τ has parts that are not plain stored tensors (LoRA products, DoRA, saved modules)."""
    return any(leaf.has_nonlinear(name, store) for _, leaf in terms)
