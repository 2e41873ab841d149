"""YAML merge recipes: a pydantic schema, line-numbered errors, and mergekit configs.

Native shape::

    base: org/base-model@rev            # Hub id[@revision] or local path
    method: ties
    parameters: {density: 0.2, lambda: 1.0}
    tasks:
      - model: org/finetune-a           # full finetune
        weight: 0.5
      - adapter: org/lora-b             # PEFT adapter
        weight: 0.5
        parameters: {density: 0.3}
    dtype: bfloat16
    seed: 0
    output: {format: model}

A parameter value is a number, a list of numbers interpolated across layers (mergekit's
"gradient"), or a list of ``{filter: substring, value: ...}`` choosing by tensor name (first match;
an entry without filter is the default). A mergekit YAML (``models``/``base_model``/``merge_method``)
is accepted unchanged and translated; options we do not support are refused by name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Union

import yaml
from pydantic import BaseModel as Schema
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError

Scalar = Union[bool, int, float, str]
# Trim-based methods that can select their top-k over the whole model (two extra passes).
GLOBAL_TOPK_METHODS = {"ties", "magnitude_prune", "breadcrumbs", "breadcrumbs_ties"}


class Conditional(Schema):
    """One entry of a per-tensor parameter: ``value`` where ``filter`` is in the tensor name."""

    model_config = ConfigDict(extra="forbid")
    value: Union[Scalar, List[Union[int, float]]]
    filter: Optional[str] = None


ParamValue = Union[Scalar, List[Union[int, float]], List[Conditional]]


class TaskSpec(Schema):
    """One input: a full finetune (``model``) or a PEFT adapter (``adapter``)."""

    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    adapter: Optional[str] = None
    weight: ParamValue = 1.0
    parameters: Dict[str, ParamValue] = Field(default_factory=dict)
    exclude: List[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_source(self) -> "TaskSpec":
        if (self.model is None) == (self.adapter is None):
            raise ValueError("give exactly one of 'model' (full finetune) or 'adapter' (PEFT adapter)")
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"exclude pattern {pattern!r} is not a regular expression ({err})") from None
        return self

    @property
    def ref(self) -> str:
        return self.model if self.model is not None else self.adapter  # type: ignore[return-value]


class PushSpec(Schema):
    """Where to publish the output (see the Hub round trip)."""

    model_config = ConfigDict(extra="forbid")
    repo_id: str
    private: Optional[bool] = None
    revision: Optional[str] = None
    create_pr: bool = False
    commit_message: Optional[str] = None


class OutputSpec(Schema):
    model_config = ConfigDict(extra="forbid")
    format: Literal["model", "adapter"] = "model"
    max_shard_size: Union[int, str] = "5GB"
    push_to_hub: Optional[PushSpec] = None
    # adapter output (LoRA-native merges)
    mode: Optional[str] = None
    rank: Optional[int] = None
    energy: Optional[float] = None


class Recipe(Schema):
    """A validated merge recipe. Build with :func:`load_recipe` or ``Recipe(**dict)``."""

    model_config = ConfigDict(extra="forbid")
    base: Optional[str] = None
    method: str
    parameters: Dict[str, ParamValue] = Field(default_factory=dict)
    tasks: List[TaskSpec] = Field(min_length=1)
    dtype: Optional[Literal["bfloat16", "float16", "float32", "bf16", "fp16", "fp32"]] = None
    seed: int = 0
    tokenizer_source: Optional[str] = None
    topk_scope: Literal["tensor", "global"] = "tensor"
    output: OutputSpec = Field(default_factory=OutputSpec)
    source_format: Literal["native", "mergekit"] = "native"

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from .methods import METHODS

        if value not in METHODS:
            raise ValueError(f"unknown method {value!r}; known: {', '.join(sorted(METHODS))}")
        return value

    @model_validator(mode="after")
    def _check_method(self) -> "Recipe":
        try:
            return self._check_method_inner()
        except RecipeError as err:
            raise ValueError(str(err)) from None

    def _check_method_inner(self) -> "Recipe":
        from .methods import get_method, validate_params

        spec = get_method(self.method)
        n = len(self.tasks)
        if spec.needs_base and not self.base:
            raise ValueError(f"method {self.method!r} needs a 'base' model")
        if spec.min_tasks and n < spec.min_tasks or spec.max_tasks and n > spec.max_tasks:
            want = spec.min_tasks if spec.min_tasks == spec.max_tasks else f"{spec.min_tasks}..{spec.max_tasks or 'any'}"
            raise ValueError(f"method {self.method!r} takes {want} task(s), got {n}")
        for params in [self.parameters] + [t.parameters for t in self.tasks]:
            for name, value in params.items():
                _check_param(self.method, name, value, validate_params)
            combined = {**self.parameters, **params}
            if all(not isinstance(v, list) for v in combined.values()):
                validate_params(self.method, combined)  # cross-field checks (e.g. DELLA's epsilon)
        if self.topk_scope == "global" and self.method not in GLOBAL_TOPK_METHODS:
            raise ValueError(
                f"topk_scope 'global' applies to {', '.join(sorted(GLOBAL_TOPK_METHODS))}, not {self.method!r}"
            )
        return self

    def to_yaml(self) -> str:
        """The recipe as YAML (used in model cards; contains no token)."""
        data = self.model_dump(mode="json", exclude_defaults=True, exclude={"source_format"})
        data.setdefault("method", self.method)
        return yaml.safe_dump(data, sort_keys=False)


def _check_param(method: str, name: str, value: Any, validate) -> None:
    for scalar in _scalars(value):
        validate(method, {name: scalar})


def _scalars(value: Any) -> List[Any]:
    if isinstance(value, list):
        out: List[Any] = []
        for v in value:
            out.extend(_scalars(v.value) if isinstance(v, Conditional) else [v])
        return out
    return [value]


# ----------------------------------------------------------------------- parameter evaluation
def evaluate(value: ParamValue, tensor_name: str, t: float) -> Any:
    """A parameter's value for one tensor at layer position ``t`` ∈ [0, 1] (mergekit semantics)."""
    if isinstance(value, list):
        if value and all(isinstance(v, Conditional) for v in value):
            for cond in value:
                if cond.filter in (None, "*") or cond.filter in tensor_name:
                    return evaluate(cond.value, tensor_name, t)
            return None
        if value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            scaled = t * (len(value) - 1)
            i0 = int(scaled)
            i1 = min(len(value) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * value[i0] + frac * value[i1]
    return value


_LAYER = re.compile(r"\.(?:layers|h|layer|blocks)\.(\d+)\.")


def layer_position(name: str, num_layers: int) -> float:
    """t for a tensor: i/(L−1) inside layer i, 0 before the layers (embeddings), 1 after them."""
    m = _LAYER.search("." + name)
    if m:
        return int(m.group(1)) / max(1, num_layers - 1)
    return 0.0 if re.search(r"embed|wte|wpe|tok_embeddings", name) else 1.0


# ----------------------------------------------------------------------- loading
def load_recipe(source: Union[str, os.PathLike, Dict[str, Any]]) -> Recipe:
    """Load a native or mergekit recipe from a YAML file (or a dict).

    Raises:
        RecipeError: naming the field, and the file line where possible.
    """
    if isinstance(source, dict):
        return _validate(source, None, "<recipe>")
    path = Path(source)
    try:
        text = path.read_text()
    except OSError as err:
        raise RecipeError(f"{path}: cannot read recipe ({err.strerror})") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping")
    recipe = _validate(data, node, str(path))
    return _resolve_relative_paths(recipe, path.parent)


def _validate(data: Dict[str, Any], node, where: str) -> Recipe:
    is_mergekit = "merge_method" in data or "models" in data or "slices" in data
    try:
        if is_mergekit:
            from .mergekit_compat import from_mergekit

            data = from_mergekit(data)
        return Recipe(**data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = [p for p in first["loc"] if not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS))]
        field = ".".join(str(p) for p in loc) or "recipe"
        line = _line_of(node, loc) if node is not None and not is_mergekit else None
        at = f"{where}:{line}" if line else where
        msg = first["msg"].removeprefix("Value error, ")
        raise RecipeError(f"{at}: field '{field}': {msg}") from None


_UNION_TAGS = {"bool", "int", "float", "str", "list[union[int,float]]", "list[Conditional]", "function-after"}


def _line_of(node, loc: List[Any]) -> Optional[int]:
    """1-based line of the YAML node at ``loc`` (or its deepest existing parent)."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            match = [(k, v) for k, v in node.value if k.value == part]
            if not match:
                return line
            key, node = match[0]
            line = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _resolve_relative_paths(recipe: Recipe, folder: Path) -> Recipe:
    """Local paths in a recipe are relative to the recipe file."""

    def fix(ref: Optional[str]) -> Optional[str]:
        if ref and ref.startswith(("./", "../")):
            return str((folder / ref).resolve())
        return ref

    recipe.base = fix(recipe.base)
    recipe.tokenizer_source = fix(recipe.tokenizer_source)
    for task in recipe.tasks:
        if task.model is not None:
            task.model = fix(task.model)
        else:
            task.adapter = fix(task.adapter)
    return recipe
