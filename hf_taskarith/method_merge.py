"""Merge methods (TIES, DARE, SLERP, ...) on the streaming engine, and recipes that drive them."""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

from .engine import LazyTensor, StreamingMerge
from .errors import RecipeError
from .methods import METHODS, MethodSpec, get_method
from .recipe import ParamValue, Recipe, evaluate, layer_position
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
        recipe: Optional[Recipe] = None,
    ):
        super().__init__(base)
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

    def compute(self, name: str, base: LazyTensor) -> torch.Tensor:
        base_tensor = base.get()
        if name not in self._touched:
            return base_tensor
        store = self.base.store
        t = layer_position(name, self.num_layers)
        deltas = torch.zeros((len(self.tasks), *base_tensor.shape), dtype=torch.float32, device=base_tensor.device)
        for i, task in enumerate(self.tasks):
            task.vector.add_delta_(deltas[i], name, 1.0, store, base_tensor)
        weights = torch.tensor([float(evaluate(task.weight, name, t)) for task in self.tasks], device=base_tensor.device)
        params = self.params_for(name)
        kwargs = {("lambda_" if k == "lambda" else k): v for k, v in params.items()}
        if self.spec.stochastic:
            gen = torch.Generator(device=base_tensor.device)
            gen.manual_seed(tensor_seed(self.seed, name))
            kwargs["generator"] = gen
        merged_delta = self.spec.fn(deltas, weights, base_tensor, **kwargs)
        del deltas
        return base_tensor.add_(merged_delta)


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
    return MethodMerge(base, recipe.method, tasks, recipe.parameters, seed=recipe.seed, recipe=recipe)


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
        merge.push_to_hub(
            push.repo_id, private=push.private, revision=push.revision, create_pr=push.create_pr,
            commit_message=push.commit_message, token=token,
        )
    return out
