"""Run mergekit YAML configs unchanged.

A mergekit config (``models``, ``base_model``, ``merge_method``, ``parameters``, ``dtype`` and
per-model ``weight``/``density``/``gamma``/``epsilon``/``lambda``/``normalize``/``rescale``) is
translated into a native recipe that reproduces mergekit's semantics, which differ from the
papers in two places (see the README):

* TIES-family sign election: mergekit elects on the *weighted* deltas and divides by Σ w_i·mask_i
  (``weighted_election: true``); native recipes follow the paper and PEFT.
* DARE rescaling: 1/(1−p) in both; mergekit's newer L1-norm matching is ``rescale_method: l1``.

Anything we cannot reproduce is refused by name, never silently ignored.
"""

from __future__ import annotations

from typing import Any, Dict, List

from .errors import RecipeError

SUPPORTED = {
    "linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "model_stock",
}
# Methods whose base model is an input with its own weight (a zero task vector), not only the origin.
BASE_IS_INPUT = {"linear", "slerp"}
# mergekit's TIES-style methods elect signs on weighted deltas.
WEIGHTED_ELECTION = {"ties", "dare_ties", "breadcrumbs_ties", "della"}
# mergekit's registry: only these divide by Σ w_i·mask_i unless the config says otherwise.
NORMALIZE_DEFAULT_TRUE = {"ties", "della"}
# Parameters that change nothing in the result (memory or speed switches).
NO_OP = {"int8_mask"}
PARAMS = {"weight", "density", "gamma", "epsilon", "lambda", "normalize", "rescale", "t", "filter_wise"}
TOP_LEVEL = {"models", "base_model", "merge_method", "parameters", "dtype", "out_dtype", "tokenizer_source", "name"}


def _model_ref(ref: Any, where: str) -> str:
    if isinstance(ref, dict):  # mergekit also accepts {model: {path: ...}, lora: ...}
        raise RecipeError(f"{where}: structured model references are not supported; use 'org/name' or a path")
    ref = str(ref)
    if "+" in ref:
        raise RecipeError(f"{where}: '{ref}': mergekit's model+lora syntax is not supported; list the adapter as a task")
    return ref


def _params(params: Dict[str, Any] | None, where: str) -> Dict[str, Any]:
    out = {}
    for key, value in (params or {}).items():
        if key in NO_OP:
            continue
        if key not in PARAMS:
            raise RecipeError(f"{where}.parameters.{key}: mergekit option {key!r} is not supported")
        out[key] = value
    return out


def from_mergekit(config: Dict[str, Any]) -> Dict[str, Any]:
    """Translate a mergekit config dict into a native recipe dict.

    Raises:
        RecipeError: naming the first unsupported option.
    """
    for key in config:
        if key not in TOP_LEVEL:
            what = "slices/modules (layer-range surgery)" if key in ("slices", "modules") else repr(key)
            raise RecipeError(f"mergekit config: {what} is not supported")
    method = config.get("merge_method")
    if method not in SUPPORTED:
        raise RecipeError(
            f"mergekit config: merge_method {method!r} is not supported; supported: {', '.join(sorted(SUPPORTED))}"
        )
    base = _model_ref(config["base_model"], "base_model") if config.get("base_model") else None
    models: List[Dict[str, Any]] = config.get("models") or []
    if not models:
        raise RecipeError("mergekit config: 'models' is empty")
    global_params = _params(config.get("parameters"), "parameters")
    tasks = []
    for i, entry in enumerate(models):
        if not isinstance(entry, dict) or "model" not in entry:
            raise RecipeError(f"models[{i}]: each entry needs a 'model'")
        extra = set(entry) - {"model", "parameters"}
        if extra:
            raise RecipeError(f"models[{i}]: unsupported key(s) {sorted(extra)}")
        ref = _model_ref(entry["model"], f"models[{i}].model")
        params = _params(entry.get("parameters"), f"models[{i}]")
        if ref == base and method not in BASE_IS_INPUT:
            continue  # the base is the origin of the task vectors, not a task
        weight = params.pop("weight", global_params.get("weight", 1.0))
        tasks.append({"model": ref, "weight": weight, "parameters": params})
    if base is None:
        if method not in BASE_IS_INPUT:
            raise RecipeError(f"mergekit config: merge_method {method!r} needs base_model")
        base = tasks[0]["model"]  # layout and origin only: its own τ is zero
    params = {k: v for k, v in global_params.items() if k != "weight"}
    if method == "slerp" and len(tasks) == 1 and config.get("base_model"):
        # mergekit's slerp goes from base_model (t=0) to the other model (t=1).
        tasks.insert(0, {"model": base, "weight": 1.0, "parameters": {}})
    if method in WEIGHTED_ELECTION:
        params["weighted_election"] = True
    if method in WEIGHTED_ELECTION or method in ("task_arithmetic", "dare_linear", "breadcrumbs", "della_linear"):
        params.setdefault("normalize", method in NORMALIZE_DEFAULT_TRUE)
    dtype = config.get("out_dtype") or config.get("dtype")
    tok = config.get("tokenizer_source")
    if tok == "union":
        raise RecipeError("mergekit config: tokenizer_source 'union' is not supported (use 'base' or a model)")
    return {
        "base": base,
        "method": method,
        "parameters": params,
        "tasks": tasks,
        "dtype": dtype,
        "tokenizer_source": None if tok in (None, "base") else _model_ref(tok, "tokenizer_source"),
        "source_format": "mergekit",
    }
