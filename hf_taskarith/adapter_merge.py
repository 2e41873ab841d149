"""LoRA-native merging: adapters in, one PEFT adapter out, never a dense ΔW.

Per target module (the union over the adapters; a module missing from one adapter has zero delta
there) the factors ``(A_i, B_i, c_i)`` with ``c_i = λ·w_i·s_i`` describe ``ΔW = Σ c_i B_i A_i``.
The modes (math in :mod:`hf_taskarith.lora_merge`):

* ``exact``: concatenated factors, rank Σ r_i, ΔW exact;
* ``svd``: the best rank-r approximation from QR of the stacked factors and an SVD of the small core;
  ``energy`` picks the rank per module (written as ``rank_pattern``);
* ``knots``: KnOTS — the adapters are aligned in the SVD basis of their concatenated updates and the
  per-task coefficient blocks are merged with a recipe method (TIES, DARE, TA...).

DoRA adapters are refused: the magnitude renormalisation is not a low-rank update, so no LoRA adapter
reproduces it; merge them into a full model (``output.format: model``) instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from .adapter_io import adapter_config, lora_keys, write_adapter
from .errors import IncompatibleTensorsError, RecipeError, UnsupportedAdapterError
from .lora import PEFT_PREFIX, LoraModule
from .task_vector import BaseModel, LoraTaskVector

logger = logging.getLogger(__name__)

MODES = ("exact", "svd", "knots")
LINEAR_METHODS = {"task_arithmetic", "linear"}


@dataclass
class AdapterInput:
    vector: LoraTaskVector
    weight: float = 1.0


class AdapterMerge:
    """Merge LoRA adapters on one base into one LoRA adapter.

    Args:
        base: The base model the adapters were trained on (used for shapes and saved modules).
        inputs: The adapters with their weights (negative weights negate).
        mode: ``exact``, ``svd`` or ``knots``.
        rank: Output rank per module (``svd``/``knots``); ``None`` keeps the full rank.
        energy: ``svd``: smallest rank per module keeping this fraction of Σ S².
        method: ``task_arithmetic``/``linear`` for exact/svd; any tensor method for knots.
        parameters: Method parameters (``lambda``, ``density``, ...).
        seed: Seed for stochastic knots methods.
    """

    def __init__(
        self,
        base: BaseModel,
        inputs: List[AdapterInput],
        *,
        mode: str = "exact",
        rank: Optional[int] = None,
        energy: Optional[float] = None,
        method: str = "task_arithmetic",
        parameters: Optional[Dict[str, Any]] = None,
        seed: int = 0,
    ):
        if mode not in MODES:
            raise RecipeError(f"field 'output.mode': {mode!r} is not one of {', '.join(MODES)}")
        if mode != "knots" and method not in LINEAR_METHODS:
            raise RecipeError(
                f"field 'method': {method!r} with adapter output needs output.mode 'knots' "
                "(exact and svd merge a linear combination: task_arithmetic or linear)"
            )
        if energy is not None and mode != "svd":
            raise RecipeError("field 'output.energy': an energy threshold applies to mode 'svd'")
        self.base = base
        self.inputs = inputs
        self.mode, self.rank, self.energy = mode, rank, energy
        self.method = method
        self.parameters = dict(parameters or {})
        self.seed = seed
        self._check()

    def _check(self) -> None:
        if not self.inputs:
            raise RecipeError("field 'tasks': adapter output needs at least one adapter")
        bases = {}
        fif = set()
        for item in self.inputs:
            cfg = item.vector.config
            if cfg.get("use_dora") or any(m.magnitude_key for m in item.vector.adapter.modules.values()):
                raise UnsupportedAdapterError(
                    f"{item.vector.label}: DoRA adapters cannot be merged into a LoRA adapter (the magnitude "
                    "renormalisation is not low-rank); use output.format: model"
                )
            item.vector.bind(self.base.store, self.base.config)  # shapes: adapter trained on this base?
            name = cfg.get("base_model_name_or_path")
            if name:
                bases[item.vector.label] = str(name).rstrip("/")
            fif.add(bool(cfg.get("fan_in_fan_out")))
        if len({Path(b).name if Path(b).is_absolute() else b for b in bases.values()}) > 1:
            listing = "; ".join(f"{k}: {v}" for k, v in bases.items())
            raise IncompatibleTensorsError(f"adapters were trained on different base models ({listing})")
        if len(fif) > 1:
            raise IncompatibleTensorsError("adapters disagree on fan_in_fan_out (different architectures)")
        self.fan_in_fan_out = fif.pop()

    def _weights(self) -> List[float]:
        lam = float(self.parameters.get("lambda", 1.0))
        w = [float(i.weight) for i in self.inputs]
        if self.method == "linear" and self.parameters.get("normalize", True):
            total = sum(w)
            if abs(total) < 1e-12:
                raise RecipeError("method 'linear': weights sum to zero, cannot normalize")
            w = [x / total for x in w]
        return [lam * x for x in w] if self.mode != "knots" else w

    def merged_factors(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, int], List[str], Dict[str, str]]:
        """(tensors in PEFT's saved format, rank per module, target modules, module kinds)."""
        from . import lora_merge

        weights = self._weights()
        modules: Dict[str, List[Tuple[LoraTaskVector, LoraModule, float]]] = {}
        full: Dict[str, List[Tuple[LoraTaskVector, str, float]]] = {}
        for item, w in zip(self.inputs, weights):
            for name, (mod, full_key) in item.vector._names[self.base.store.identity].items():
                if mod is not None:
                    modules.setdefault(name, []).append((item.vector, mod, w))
                if full_key is not None:
                    full.setdefault(name, []).append((item.vector, full_key, w))
        tensors: Dict[str, torch.Tensor] = {}
        ranks: Dict[str, int] = {}
        kinds: Dict[str, str] = {}
        for name in sorted(modules):
            entries = modules[name]
            kind_set = {mod.kind for _, mod, _ in entries}
            if len(kind_set) > 1:
                raise IncompatibleTensorsError(f"module {name!r} is an embedding in one adapter and linear in another")
            factors = []
            for vec, mod, w in entries:
                a = vec.adapter.weights.get(mod.a_key).float()
                b = vec.adapter.weights.get(mod.b_key).float()
                factors.append((a, b, w * mod.scaling))
            if self.mode == "exact":
                a, b = lora_merge.merge_exact(factors)
            elif self.mode == "svd":
                a, b = lora_merge.merge_svd(factors, rank=self.rank, energy=self.energy)[:2]
            else:
                params = {k: v for k, v in self.parameters.items()}
                a, b = lora_merge.knots_merge(factors, method=self.method, rank=self.rank, seed=self.seed, **params)[:2]
            module = name[: -len(".weight")] if name.endswith(".weight") else name
            if a.shape[0] == 0:
                continue  # the update cancelled out entirely
            kind = kind_set.pop()
            a_key, b_key = lora_keys(module, kind)
            tensors[a_key], tensors[b_key] = a.contiguous(), b.contiguous()
            ranks[module] = a.shape[0]
            kinds[module] = kind
        for name, entries in sorted(full.items()):
            # modules_to_save / saved biases: θ = θ0 + Σ w_i (saved_i − θ0), exact and dense (they are small)
            base_t = self.base.store.get(name).float()
            acc = base_t.clone()
            lam = 1.0 if self.mode != "knots" else float(self.parameters.get("lambda", 1.0))
            for vec, key, w in entries:
                acc.add_(vec.adapter.weights.get(key).float() - base_t, alpha=lam * w)
            tensors[PEFT_PREFIX + name] = acc
        return tensors, ranks, sorted(ranks), kinds

    def describe(self) -> Dict[str, Any]:
        from .methods import get_method

        return {
            "method": f"{self.method} (LoRA-native, {self.mode})",
            "paper": get_method(self.method).paper
            + ("; KnOTS: Model merging with SVD to tie the KnOTS (Stoica et al., ICLR 2025), arXiv:2410.19735" if self.mode == "knots" else ""),
            "base": self.base.resolved.display_name,
            "base_commit": self.base.resolved.commit_sha,
            "tasks": [
                {"name": i.vector.name, "kind": "adapter", "weight": i.weight,
                 "commit": i.vector.source.commit_sha if i.vector.source else None}
                for i in self.inputs
            ],
        }

    def model_card(self, repo_id: Optional[str] = None):
        import yaml

        from .card import build_model_card

        desc = self.describe()
        recipe = {
            "base": desc["base"], "method": self.method, "parameters": self.parameters,
            "tasks": [{"adapter": t["name"], "weight": t["weight"]} for t in desc["tasks"]],
            "output": {"format": "adapter", "mode": self.mode, **({"rank": self.rank} if self.rank else {}),
                       **({"energy": self.energy} if self.energy else {})},
        }
        return build_model_card(
            desc, base_path=self.base.path, input_paths=[i.vector.source.path for i in self.inputs if i.vector.source],
            base_repo_id=self.base.resolved.repo_id,
            input_repo_ids=[i.vector.source.repo_id if i.vector.source else None for i in self.inputs],
            output_format="adapter", recipe_yaml=yaml.safe_dump(recipe, sort_keys=False), repo_id=repo_id,
        )

    def save_pretrained(
        self, out_dir: Union[str, Path], *, dtype: Optional[torch.dtype] = None, overwrite: bool = False
    ) -> Path:
        """Write the merged adapter folder (PEFT format, atomic)."""
        tensors, ranks, targets, _ = self.merged_factors()
        bias_all = False
        for key in [k for k in tensors if ".lora_" not in k]:
            module, _, param = key[len(PEFT_PREFIX):].rpartition(".")
            if module in ranks:  # a saved bias of an adapted module lives under PEFT's base_layer
                tensors[f"{PEFT_PREFIX}{module}.base_layer.{param}"] = tensors.pop(key)
                bias_all = True
        saved = {k[len(PEFT_PREFIX):].rpartition(".")[0] for k in tensors if ".lora_" not in k and ".base_layer." not in k}
        mts = sorted(saved)
        config = adapter_config(
            base_model=self.base.resolved.display_name if not self.base.resolved.is_hub else self.base.resolved.repo_id,
            ranks=ranks, target_modules=targets, fan_in_fan_out=self.fan_in_fan_out, modules_to_save=mts,
        )
        if bias_all:
            config["bias"] = "all"
        inputs = [self.base.path] + [i.vector.source.path for i in self.inputs if i.vector.source]
        return write_adapter(
            out_dir, config, tensors, dtype=dtype, overwrite=overwrite, inputs=inputs, readme=str(self.model_card())
        )
