"""Merge methods (TIES, DARE, SLERP, ...) on the streaming engine, and recipes that drive them."""

from __future__ import annotations

import logging
import math
import re
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from .engine import LazyTensor, StreamingMerge
from .errors import RecipeError
from .methods import MethodSpec, align_heads, get_method, group_permutation, hierarchical_weight, permute_heads
from .recipe import _LAYER, ParamValue, Recipe, evaluate, layer_position
from .refs import ResolvedModel
from .task_vector import BaseModel, LeafTaskVector, LoraTaskVector, TaskVector

logger = logging.getLogger(__name__)


@dataclass
class MergeTask:
    """One input of a method merge: its task vector, weight and parameter overrides."""

    vector: LeafTaskVector
    weight: ParamValue = 1.0
    parameters: Dict[str, ParamValue] = field(default_factory=dict)


def _jsonable(value: Any) -> Any:
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if hasattr(value, "model_dump"):
        return value.model_dump(exclude_none=True)
    return value


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed independent of processing order (and of which process runs it)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


class MethodMerge(StreamingMerge):
    """θ = θ0 + method(τ_1..τ_T, weights, θ0; params) per tensor.

    Args:
        base: The base model.
        method: A name from :data:`hf_taskarith.methods.METHODS`.
        tasks: The inputs with weights and per-task parameters.
        parameters: Method parameters (scalars, layer gradients or per-tensor filters).
        seed: Seed for stochastic methods; the same seed gives the same bytes.
        recipe: The recipe this merge came from, if any (for provenance).
    """

    def __init__(
        self,
        base: BaseModel,
        method: str,
        tasks: List[MergeTask],
        parameters: Optional[Dict[str, ParamValue]] = None,
        *,
        seed: int = 0,
        topk_scope: str = "tensor",
        recipe: Optional[Recipe] = None,
    ):
        super().__init__(base)
        self.topk_scope = topk_scope
        self._thresholds: Optional[torch.Tensor] = None
        self._layer_weights: Dict[str, float] = {}
        self._layer_perms: Dict[str, Optional[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self.spec: MethodSpec = get_method(method)
        self.tasks = tasks
        self.parameters = dict(parameters or {})
        self.seed = seed
        self.recipe = recipe
        self.num_layers = int(base.config.get("num_hidden_layers") or base.config.get("n_layer") or 1)
        self._touched: set = set()

    def validate(self) -> None:
        n = len(self.tasks)
        if self.spec.min_tasks and n < self.spec.min_tasks or self.spec.max_tasks and n > self.spec.max_tasks:
            raise RecipeError(f"method {self.spec.name!r}: got {n} task(s)")
        for task in self.tasks:
            self._touched.update(task.vector.bind(self.base.store, self.base.config))
        if self.topk_scope == "global":
            self._thresholds = self._global_thresholds()

    # ------------------------------------------------------------------ global top-k
    def _task_deltas(self, i: int):
        """Yield task i's τ for every touched tensor (one pass over that input).

        In a multi-process save each rank takes every world_size-th tensor and the histograms
        are summed over ranks; on CUDA the τ are formed (and histogrammed) on the GPU.
        """
        from .checkpoint import reads_to_device
        from .distributed import split_names

        store = self.base.store
        names = [n for n in sorted(self._touched) if store.dtype(n).is_floating_point]
        ctx = self._dist
        if ctx is not None and ctx.distributed:
            names = split_names(names, ctx.rank, ctx.world_size)
        device = self._device if self._device is not None and self._device.type == "cuda" else None
        for name in names:
            with reads_to_device(device):
                base_t = store.get(name).float()
                acc = torch.zeros_like(base_t)
                self.tasks[i].vector.add_delta_(acc, name, 1.0, store, base_t)
            yield acc

    def _global_thresholds(self) -> torch.Tensor:
        """Per-task magnitude thresholds of a top-k over the whole model (two passes per task)."""
        from .global_topk import kth_largest_magnitudes

        store = self.base.store
        total = sum(math.prod(store.shape(n)) for n in self._touched if store.dtype(n).is_floating_point)
        ctx = self._dist
        sum_over_ranks = ctx.sum_over_ranks if ctx is not None and ctx.distributed else None
        rows = []
        for i, task in enumerate(self.tasks):
            density = self._scalar_param("density", task)
            if self.spec.name.startswith("breadcrumbs"):
                gamma = self._scalar_param("gamma", task)
                target, n_top = int(density * total), int(gamma * total)
                n_bot = total - target - n_top
                if n_bot < 0:
                    n_top, n_bot = n_top + n_bot, 0
                lower, upper = kth_largest_magnitudes(
                    lambda i=i: self._task_deltas(i), [total - n_bot, n_top], sum_over_ranks=sum_over_ranks
                )
                rows.append([0.0 if density >= 1 else lower, upper if n_top > 0 and density < 1 else float("inf")])
            else:
                k = int(density * total)
                if density >= 1:
                    rows.append([0.0])
                else:
                    thr = kth_largest_magnitudes(lambda i=i: self._task_deltas(i), [k], sum_over_ranks=sum_over_ranks)
                    rows.append([thr[0]])
        logger.info("global top-k thresholds per task: %s", rows)
        return torch.tensor(rows, dtype=torch.float32).squeeze(-1)

    def _thresholds_on(self, device: torch.device) -> torch.Tensor:
        """The global thresholds on ``device`` (copied there once, not once per tensor)."""
        with self._lock:
            cache = self.__dict__.setdefault("_thresholds_by_device", {})
            if str(device) not in cache:
                cache[str(device)] = self._thresholds.to(device)
            return cache[str(device)]

    def _scalar_param(self, key: str, task: MergeTask) -> float:
        value = task.parameters.get(key, self.parameters.get(key, self.spec.defaults.get(key)))
        if isinstance(value, list):
            raise RecipeError(f"field 'parameters.{key}': topk_scope 'global' needs one value per task, not per tensor")
        return float(value)

    # ------------------------------------------------------------------ layer scope (hierarchical)
    def _layer_of(self, name: str) -> str:
        m = _LAYER.search("." + name)
        return m.group(0) if m else name

    def _layer_state(self, layer: str) -> Tuple[float, Optional[torch.Tensor]]:
        """(w_l, head permutation of model B) for one layer, computed once from all its tensors."""
        with self._lock:
            if layer not in self._layer_weights:
                names = [n for n in sorted(self._touched) if self._layer_of(n) == layer]
                perm = self._align(names) if self.params_for(names[0]).get("align_heads") else None
                a_list, b_list = [], []
                for n in names:
                    d = self._deltas(n, self.base.store.get(n).float(), perm)
                    a_list.append(d[0])
                    b_list.append(d[1])
                self._layer_weights[layer] = hierarchical_weight(a_list, b_list)
                self._layer_perms[layer] = perm
            return self._layer_weights[layer], self._layer_perms[layer]

    def _align(self, names: List[str]) -> Optional[torch.Tensor]:
        proj = {}
        for n in names:
            m = re.search(r"\.(q|k|v|o)_proj\.weight$", n)
            if m:
                proj[m.group(1)] = n
        if set(proj) != {"q", "k", "v", "o"}:
            return None  # not an attention layer with separate q/k/v/o projections
        heads = int(self.base.config.get("num_attention_heads"))
        kv = int(self.base.config.get("num_key_value_heads") or heads)
        thetas = {}
        for key, n in proj.items():
            base_t = self.base.store.get(n).float()
            pair = []
            for task in self.tasks:
                acc = base_t.clone()
                task.vector.add_delta_(acc, n, 1.0, self.base.store, base_t)
                pair.append(acc)
            thetas[key] = pair
        return align_heads(
            thetas["q"][0], thetas["q"][1], heads, k_a=thetas["k"][0], k_b=thetas["k"][1],
            v_a=thetas["v"][0], v_b=thetas["v"][1], o_a=thetas["o"][0], o_b=thetas["o"][1], num_kv_heads=kv,
        )

    def _permute_b(self, name: str, theta_b: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        heads = int(self.base.config.get("num_attention_heads"))
        kv = int(self.base.config.get("num_key_value_heads") or heads)
        m = re.search(r"\.(q|k|v|o)_proj\.(weight|bias)$", name)
        if not m:
            return theta_b
        if m.group(1) == "q":
            return permute_heads(theta_b, perm, heads, 0)
        if m.group(1) in ("k", "v"):
            return permute_heads(theta_b, group_permutation(perm, heads, kv), kv, 0)
        return permute_heads(theta_b, perm, heads, 1) if m.group(2) == "weight" else theta_b

    def inputs(self) -> List[ResolvedModel]:
        return [t.vector.source for t in self.tasks if t.vector.source is not None]

    def describe(self) -> Dict[str, Any]:
        return {
            "method": self.spec.name,
            "paper": self.spec.paper,
            "base": self.base.resolved.display_name,
            "base_commit": self.base.resolved.commit_sha,
            "seed": self.seed if self.spec.stochastic else None,
            "parameters": {k: _jsonable(v) for k, v in self.parameters.items()},
            "tasks": [
                {
                    "name": t.vector.name,
                    "kind": "adapter" if isinstance(t.vector, LoraTaskVector) else "model",
                    "commit": t.vector.source.commit_sha if t.vector.source else None,
                    "weight": _jsonable(t.weight),
                    **({"parameters": {k: _jsonable(v) for k, v in t.parameters.items()}} if t.parameters else {}),
                }
                for t in self.tasks
            ],
        }

    def params_for(self, name: str) -> Dict[str, Any]:
        """Method parameters for one tensor: defaults < global < per task (a list when tasks differ)."""
        t = layer_position(name, self.num_layers)
        merged: Dict[str, Any] = dict(self.spec.defaults)
        for key, value in self.parameters.items():
            merged[key] = evaluate(value, name, t)
        per_task_keys = {k for task in self.tasks for k in task.parameters}
        for key in per_task_keys:
            values = [evaluate(task.parameters.get(key, self.parameters.get(key, merged.get(key))), name, t) for task in self.tasks]
            merged[key] = values[0] if all(v == values[0] for v in values) else values
        return merged

    def _fold(self, name: str, base: LazyTensor, params: Dict[str, Any], t: float) -> torch.Tensor:
        """task_arithmetic is linear in τ: θ0 + Σ (λ·w_i[/Σw])·τ_i, folded like ``apply``.

        One fp32 accumulator and one input at a time instead of a (T, shape) stack of τ; the
        same numbers as the stacked formula up to fp32 rounding.
        """
        from .merged import fold_linear

        w = [float(evaluate(task.weight, name, t)) for task in self.tasks]
        if params.get("normalize"):
            total = math.fsum(w)
            w = [x / (total if abs(total) >= 1e-8 else 1.0) for x in w]
        lam = float(params.get("lambda", 1.0))
        return fold_linear(name, base, [(lam * x, task.vector) for x, task in zip(w, self.tasks)], self.base.store)

    def compute(self, name: str, base: LazyTensor) -> torch.Tensor:
        if name not in self._touched:
            return base.get()
        if self.spec.name == "task_arithmetic" and self.spec.scope != "layer":
            params = self.params_for(name)
            if _scalar_params(params, {"lambda", "normalize"}):
                return self._fold(name, base, params, layer_position(name, self.num_layers))
        t = layer_position(name, self.num_layers)
        if self.spec.name in _FUSED and base.device.type == "cpu":
            fused = self._fused(name, base, t)
            if fused is not None:
                return fused
        base_tensor = base.get()
        if self.spec.scope == "layer":
            w_l, perm = self._layer_state(self._layer_of(name))
            d = self._deltas(name, base_tensor, perm)
            return base_tensor.add_(d[0], alpha=1.0 - w_l).add_(d[1], alpha=w_l)
        deltas = self._deltas(name, base_tensor)
        weights = torch.tensor([float(evaluate(task.weight, name, t)) for task in self.tasks], device=base_tensor.device)
        params = self.params_for(name)
        kwargs = {("lambda_" if k == "lambda" else k): v for k, v in params.items()}
        if self._thresholds is not None:
            kwargs["thresholds"] = self._thresholds_on(base_tensor.device)
        if kwargs.get("rng") == "counter":
            kwargs["key"] = tensor_seed(self.seed, name)
        elif self.spec.stochastic:
            gen = torch.Generator(device=base_tensor.device)
            gen.manual_seed(tensor_seed(self.seed, name))
            kwargs["generator"] = gen
        merged_delta = self.spec.fn(deltas, weights, base_tensor, **kwargs)
        del deltas
        return base_tensor.add_(merged_delta)

    def _fused_inputs(self, name: str) -> Optional[List[torch.Tensor]]:
        """Mapped views of the finetuned tensors θ_i when every τ_i is a plain θ_i − θ0 (full
        finetunes), else None."""
        from .checkpoint import mapped_reads

        store = self.base.store
        loads = []
        for task in self.tasks:
            parts = task.vector.linear_parts(name)
            if (
                len(parts) != 2
                or parts[0][0] != 1.0 or parts[0][1] == store.identity
                or parts[1][0] != -1.0 or parts[1][1] != store.identity
                or task.vector.has_nonlinear(name, store)
            ):
                return None
            loads.append(parts[0][2])
        with mapped_reads():
            return [load() for load in loads]

    @staticmethod
    def _base_view(base: LazyTensor) -> torch.Tensor:
        from .checkpoint import mapped_reads

        with mapped_reads():
            return base.raw()

    def _fused(self, name: str, base: LazyTensor, t: float) -> Optional[torch.Tensor]:
        """θ0 + method(τ) from the fused CPU kernels (same bits as the torch path), or None when
        they do not cover this merge (adapters, other dtypes, L1 rescaling, torch RNG, ...)."""
        from . import kernels

        params = self.params_for(name)
        if not kernels.available() or any(isinstance(v, (list, tuple)) for k, v in params.items() if k != "density"):
            return None
        n_tasks = len(self.tasks)
        try:
            densities = [float(d) for d in _per_task_values(params["density"], n_tasks)]
        except ValueError:
            return None
        election = dict(
            weighted_election=bool(params.get("weighted_election", False)),
            majority_sign_method=params.get("majority_sign_method", "total"),
            normalize=bool(params["normalize"]),
            lambda_=float(params["lambda"]),
        )
        if election["majority_sign_method"] not in ("total", "frequency"):
            return None
        if self.spec.name == "ties":
            if params["rescale"]:
                return None
            fts = self._fused_inputs(name)
            if fts is None:
                return None
            weights = self._weights_f32(name, t)
            if self._thresholds is not None:
                return kernels.ties(
                    self._base_view(base), fts, weights, thresholds=self._thresholds.tolist(),
                    out_dtype=base.out_dtype, **election,
                )
            numel = math.prod(base.shape)
            ks = [numel if d >= 1.0 else int(d * numel) for d in densities]
            return kernels.ties(self._base_view(base), fts, weights, ks=ks, out_dtype=base.out_dtype, **election)
        # dare_ties / dare_linear
        if params["rng"] != "counter" or (params["rescale"] and params["rescale_method"] != "inverse"):
            return None
        fts = self._fused_inputs(name)
        if fts is None:
            return None
        key = tensor_seed(self.seed, name)
        from .methods import dare_key

        consensus = self.spec.name == "dare_ties"
        return kernels.dare(
            self._base_view(base), fts, self._weights_f32(name, t), keys=[dare_key(key, i) for i in range(n_tasks)],
            densities=densities, rescale=bool(params["rescale"]), consensus=consensus, out_dtype=base.out_dtype,
            **election,
        )

    def _weights_f32(self, name: str, t: float) -> List[float]:
        """The task weights as the torch path sees them (an fp32 tensor's values)."""
        return torch.tensor([float(evaluate(task.weight, name, t)) for task in self.tasks]).tolist()

    def _deltas(self, name: str, base_tensor: torch.Tensor, perm: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(T, *shape) stack of τ_i for one tensor (model B's heads permuted when aligning)."""
        store = self.base.store
        deltas = torch.zeros((len(self.tasks), *base_tensor.shape), dtype=torch.float32, device=base_tensor.device)
        for i, task in enumerate(self.tasks):
            task.vector.add_delta_(deltas[i], name, 1.0, store, base_tensor)
        if perm is not None:
            theta_b = self._permute_b(name, deltas[1] + base_tensor, perm)
            deltas[1] = theta_b - base_tensor
        return deltas


_FUSED = ("ties", "dare_ties", "dare_linear")  # methods with a fused CPU kernel (hf_taskarith.kernels)


def _per_task_values(value: Any, n: int) -> List[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{len(value)} values for {n} tasks")
        return list(value)
    return [value] * n


def _scalar_params(params: Dict[str, Any], allowed: set) -> bool:
    """Only ``allowed`` keys, each one value for all tasks (else the generic path validates them)."""
    return set(params) <= allowed and not any(isinstance(v, (list, tuple)) for v in params.values())


def build_merge(recipe: Recipe, *, token: Union[str, bool, None] = None) -> StreamingMerge:
    """Open the inputs of a recipe (headers only) and return the merge, ready to save.

    Raises:
        RecipeError: if the recipe cannot run (e.g. no base for a method that needs one).
    """
    if recipe.base is None:
        first = recipe.tasks[0]
        if first.adapter is not None:
            raise RecipeError("field 'base': needed when the first task is an adapter")
        base = BaseModel(first.model, token=token)
    else:
        base = BaseModel(recipe.base, token=token)
    tasks = []
    for task in recipe.tasks:
        if task.model is not None:
            vector: LeafTaskVector = TaskVector.from_models(base, task.model, exclude=task.exclude, token=token)
        else:
            vector = TaskVector.from_adapter(task.adapter, token=token)
        tasks.append(MergeTask(vector=vector, weight=task.weight, parameters=task.parameters))
    return MethodMerge(
        base, recipe.method, tasks, recipe.parameters, seed=recipe.seed, topk_scope=recipe.topk_scope, recipe=recipe
    )


def run_recipe(
    recipe: Recipe,
    out_dir: Union[str, Path],
    *,
    overwrite: bool = False,
    device: Optional[str] = None,
    token: Union[str, bool, None] = None,
    progress: bool = True,
) -> Path:
    """Run a recipe end to end and write its output folder (atomically).

    Returns:
        The output folder.
    """
    from .distributed import context_for_save
    from .engine import resolve_device

    # Under torchrun / accelerate launch (WORLD_SIZE > 1) the model's shards are split over ranks
    # inside save_pretrained; adapter outputs are small and run on rank 0 while the others wait.
    ctx = context_for_save(None, resolve_device(device))
    if recipe.output.format == "adapter":
        return Path(ctx.on_main(lambda: str(_run_adapter_recipe(recipe, out_dir, overwrite=overwrite, token=token))))
    merge = build_merge(recipe, token=token)
    out = merge.save_pretrained(
        out_dir,
        dtype=recipe.dtype,
        max_shard_size=recipe.output.max_shard_size,
        overwrite=overwrite,
        device=device,
        tokenizer_source=recipe.tokenizer_source,
        progress=progress,
    )
    push = recipe.output.push_to_hub
    if push is not None:

        def do_push() -> None:
            merge.push_to_hub(
                push.repo_id, private=push.private, revision=push.revision, create_pr=push.create_pr,
                commit_message=push.commit_message, token=token,
            )

        ctx.on_main(do_push)
    return out


def build_adapter_merge(recipe: Recipe, *, token: Union[str, bool, None] = None):
    """The :class:`~hf_taskarith.adapter_merge.AdapterMerge` of a recipe with ``output.format: adapter``."""
    from .adapter_merge import AdapterInput, AdapterMerge

    if recipe.base is None:
        raise RecipeError("field 'base': adapter output needs the base model the adapters were trained on")
    models = [t.model for t in recipe.tasks if t.model is not None]
    if models:
        raise RecipeError(
            f"field 'tasks': adapter output takes adapters only; {models[0]!r} is a full finetune "
            "(turn it into an adapter first: hf-taskarith extract-lora --base BASE --model MODEL --out DIR)"
        )
    base = BaseModel(recipe.base, token=token)
    inputs = []
    for task in recipe.tasks:
        if not isinstance(task.weight, (int, float)):
            raise RecipeError("field 'tasks.weight': adapter output needs one number per adapter")
        inputs.append(AdapterInput(TaskVector.from_adapter(task.adapter, token=token), float(task.weight)))
    out = recipe.output
    return AdapterMerge(
        base, inputs, mode=out.mode or "exact", rank=out.rank, energy=out.energy,
        method=recipe.method, parameters=recipe.parameters, seed=recipe.seed,
    )


def _run_adapter_recipe(recipe: Recipe, out_dir, *, overwrite: bool, token) -> Path:
    from .engine import parse_dtype

    merge = build_adapter_merge(recipe, token=token)
    out = merge.save_pretrained(out_dir, dtype=parse_dtype(recipe.dtype), overwrite=overwrite)
    if recipe.output.push_to_hub is not None:
        from .hub import push_folder

        push = recipe.output.push_to_hub
        push_folder(out, push.repo_id, private=push.private, revision=push.revision, create_pr=push.create_pr,
                    commit_message=push.commit_message, token=token)
    return out
