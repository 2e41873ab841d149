"""Choose merge coefficients on validation tasks, in memory.

The base model is loaded ONCE as a transformers model. For every point of a grid the merge's
delta is applied to its weights in place, the model is evaluated (lm-eval, validation split) and
the weights are restored EXACTLY (bitwise) before the next point::

    from hf_taskarith.search import search
    result = search("recipe.yaml", ["taskarith_count_up", "taskarith_count_down"], rule="addition")
    result.chosen          # {"lambda": 0.45}
    result.save("search_out")                     # JSON, markdown table, PNG plot
    write_recipe("recipe.yaml", result, "recipe.tuned.yaml")

Rules (Ilharco et al., ICLR 2023, "Editing Models with Task Arithmetic", §2 and App. B):

* ``addition``: maximise the mean NORMALISED validation accuracy, acc_merged(t) / acc_finetune(t)
  with each task's own finetune (evaluated once here, as base + τ_i, or given);
* ``negation``: minimise the (mean) target accuracy subject to the (mean) control accuracy staying
  ≥ ``threshold`` (0.95) × the base model's control accuracy.

Exact revert, memory-aware (see :class:`InPlaceDelta`): before a tensor is first changed, a copy
of it in its OWN dtype is kept (on CPU by default): the smallest copy that restores it exactly;
``restore="reload"`` keeps none and re-reads the base checkpoint instead (verified bitwise on the
first touch; a tensor whose loaded value differs from its checkpoint bytes is copied). Applying
computes ``θ0 + Σ c_i·δ_i`` in fp32 from the unmodified weights and rounds once to the model
dtype, like ``save_pretrained``. The fp32 deltas δ_i are computed once per tensor and cached on
CPU (``cache=True``: 4 bytes per changed parameter per component) or recomputed from the
checkpoints at every point (``cache=False``: a few tensors of memory, one read of the inputs per
point).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .errors import TaskArithError

logger = logging.getLogger(__name__)

DEFAULT_GRID = "0:1:0.05"
RULES = ("addition", "negation")
EvaluateFn = Callable[[Any, List[str]], Mapping[str, float]]


# ------------------------------------------------------------------------------------ grids
def parse_grid(spec: Union[str, Sequence[float], None]) -> List[float]:
    """``"0:1:0.05"`` (start:stop:step, stop included) or ``"0,0.3,0.5"`` or numbers → sorted list.

    Raises:
        TaskArithError: on malformed text, a non-positive step or more than 1000 points.
    """
    if spec is None:
        spec = DEFAULT_GRID
    if isinstance(spec, str):
        text = spec.strip()
        try:
            if ":" in text:
                parts = [float(p) for p in text.split(":")]
                if len(parts) != 3:
                    raise ValueError
                start, stop, step = parts
                if step <= 0 or stop < start:
                    raise TaskArithError(f"grid {spec!r}: need start <= stop and a positive step")
                n = int(math.floor((stop - start) / step + 1e-9)) + 1
                if n > 1000:
                    raise TaskArithError(f"grid {spec!r}: {n} points is too many (at most 1000)")
                values = [round(start + i * step, 10) for i in range(n)]
            else:
                values = [float(p) for p in text.split(",") if p.strip()]
        except ValueError:
            raise TaskArithError(f"grid {spec!r}: use start:stop:step (e.g. 0:1:0.05) or a comma list") from None
    else:
        values = [float(v) for v in spec]
    if not values or not all(math.isfinite(v) for v in values):
        raise TaskArithError(f"grid {spec!r}: no (finite) values")
    return sorted(set(values))


# ------------------------------------------------------------------------------------ deltas
class DeltaComponent:
    """One fp32 delta field δ[name] over some base tensors, computed per tensor (cached or not).

    Args:
        label: how tables and errors name it.
        names: base tensor names it changes.
        compute: ``name -> fp32 tensor`` (on CPU).
        cache: keep computed tensors (fp32, CPU).
    """

    def __init__(self, label: str, names: Sequence[str], compute: Callable[[str], torch.Tensor], cache: bool = True):
        self.label = label
        self.names = list(names)
        self._nameset = set(self.names)
        self._compute = compute
        self.cache = cache
        self._cache: Dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def touches(self, name: str) -> bool:
        return name in self._nameset

    def get(self, name: str) -> Optional[torch.Tensor]:
        """δ[name] in fp32 on CPU (``None`` when this component does not change ``name``)."""
        if name not in self._nameset:
            return None
        hit = self._cache.get(name)
        if hit is not None:
            return hit
        value = self._compute(name).to(dtype=torch.float32, device="cpu")
        if self.cache:
            with self._lock:
                self._cache[name] = value
        return value

    def cached_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._cache.values())


def _leaf_delta_fn(leaf, store) -> Callable[[str], torch.Tensor]:
    def fn(name: str) -> torch.Tensor:
        base_t = store.get(name).float()
        acc = torch.zeros_like(base_t)
        leaf.add_delta_(acc, name, 1.0, store, base_t)
        return acc

    return fn


def _combo_delta_fn(terms, store) -> Callable[[str], torch.Tensor]:
    def fn(name: str) -> torch.Tensor:
        base_t = store.get(name).float()
        acc = torch.zeros_like(base_t)
        for coef, leaf in terms:
            leaf.add_delta_(acc, name, coef, store, base_t)
        return acc

    return fn


def _method_delta_fn(merge, store, device) -> Callable[[str], torch.Tensor]:
    from .engine import LazyTensor

    def fn(name: str) -> torch.Tensor:
        lazy = LazyTensor(lambda: store.get(name), store.shape(name), device)
        merged = merge.compute(name, lazy)
        return (merged - store.get(name).to(device=device, dtype=torch.float32)).cpu()

    return fn


class MergeSpace:
    """A merge written as ``θ = θ0 + Σ_i c_i·δ_i``: what the search moves along.

    ``components[i]`` is δ_i (fp32, per tensor); ``weights`` are the coefficients at λ = 1 (the
    recipe's own weights), so λ gives ``c = λ·weights``. ``leaves`` are the task vectors, for
    evaluating each finetune as ``θ0 + τ_i``. Build with :meth:`build`.
    """

    def __init__(self, base, components, weights, leaves, *, scale_param="lambda", recipe=None, per_task=False,
                 normalize=False, kind="linear", leaf_weights=None):
        self.base = base
        self.components: List[DeltaComponent] = components
        self.weights: List[float] = [float(w) for w in weights]
        self.leaves: List[Tuple[str, Any]] = leaves
        #: each task vector's weight in the merge (its sign tells added from negated tasks)
        self.leaf_weights: List[float] = [float(w) for w in (leaf_weights or [1.0] * len(leaves))]
        self.scale_param = scale_param
        self.recipe = recipe
        self.per_task = per_task
        self.normalize = normalize
        self.kind = kind
        names: List[str] = []
        seen = set()
        for comp in components:
            for n in comp.names:
                if n not in seen:
                    seen.add(n)
                    names.append(n)
        self.names = names

    # -------------------------------------------------------------- construction
    @classmethod
    def build(cls, source, *, base=None, per_task: bool = False, cache: bool = True,
              device: Union[str, torch.device, None] = None) -> "MergeSpace":
        """From a recipe (path or ``Recipe``), a merge (``MergedModel``/``MethodMerge``) or a
        ``TaskVector`` expression with ``base``.

        Args:
            per_task: one component per task vector (for per-task weight search); else one
                component holding the whole merge delta (cheapest to cache).
            cache: cache fp32 deltas on CPU.
            device: where delta math runs for method merges (default CPU).

        Raises:
            TaskArithError: for a merge without a scale parameter (``lambda``/``alpha``), per-task
                search on a method that is not linear in each weight, or a missing base.
        """
        from .engine import StreamingMerge, resolve_device
        from .merged import MergedModel
        from .method_merge import MethodMerge, build_merge
        from .recipe import Recipe, load_recipe
        from .task_vector import BaseModel, TaskVector

        recipe = None
        if isinstance(source, (str, os.PathLike)):
            recipe = load_recipe(source)
            source = build_merge(recipe)
        elif isinstance(source, Recipe):
            recipe = source
            source = build_merge(recipe)
        dev = resolve_device(device)

        if isinstance(source, TaskVector) or isinstance(source, MergedModel):
            if isinstance(source, MergedModel):
                base_model, terms = source.base, source.terms
            else:
                if base is None:
                    raise TaskArithError("search: a TaskVector needs base= (the model it applies to)")
                base_model, terms = BaseModel.coerce(base), source.terms()
            return cls._linear(base_model, terms, per_task=per_task, cache=cache, recipe=recipe)

        if isinstance(source, MethodMerge):
            recipe = recipe or source.recipe
            spec = source.spec
            if spec.name == "task_arithmetic" and all(isinstance(t.weight, (int, float)) for t in source.tasks):
                params = source.parameters
                lam = params.get("lambda", 1.0)
                if not isinstance(lam, (int, float)):
                    raise TaskArithError("search: the recipe's lambda must be a number (it is what the search sets)")
                normalize = bool(params.get("normalize", False))
                weights = [float(t.weight) for t in source.tasks]
                if normalize:
                    total = math.fsum(weights)
                    weights = [w / (total if abs(total) >= 1e-8 else 1.0) for w in weights]
                terms = [(w, t.vector) for w, t in zip(weights, source.tasks)]
                space = cls._linear(source.base, terms, per_task=per_task, cache=cache, recipe=recipe)
                space.normalize = normalize
                return space
            if per_task:
                raise TaskArithError(
                    f"search: per-task weight search needs a merge linear in each weight (task_arithmetic with "
                    f"numeric weights), not {spec.name!r}"
                )
            scale = "lambda" if "lambda" in spec.defaults else "alpha" if "alpha" in spec.defaults else None
            if scale is None:
                raise TaskArithError(
                    f"search: method {spec.name!r} has no lambda/alpha that scales its delta; nothing to search"
                )
            if not isinstance(source.parameters.get(scale, 1.0), (int, float)):
                raise TaskArithError(f"search: the recipe's {scale} must be a number (it is what the search sets)")
            params = dict(source.parameters)
            params[scale] = 1.0
            unit = MethodMerge(source.base, spec.name, source.tasks, params, seed=source.seed,
                               topk_scope=source.topk_scope, recipe=source.recipe)
            unit._ensure_valid()
            store = source.base.store
            names = sorted({n for t in source.tasks for n in t.vector.bind(store, source.base.config)})
            comp = DeltaComponent(f"{spec.name} (at {scale}=1)", names, _method_delta_fn(unit, store, dev), cache)
            leaves = [(t.vector.name, t.vector) for t in source.tasks]
            leaf_weights = [float(t.weight) if isinstance(t.weight, (int, float)) else 1.0 for t in source.tasks]
            return cls(source.base, [comp], [1.0], leaves, scale_param=scale, recipe=recipe, kind="method",
                       leaf_weights=leaf_weights)

        if isinstance(source, StreamingMerge):
            raise TaskArithError(f"search: cannot decompose a {type(source).__name__}; give a recipe or task vectors")
        raise TaskArithError(f"search: expected a recipe, a merge or a TaskVector, got {type(source).__name__}")

    @classmethod
    def _linear(cls, base_model, terms, *, per_task: bool, cache: bool, recipe) -> "MergeSpace":
        store = base_model.store
        bound = [(float(c), leaf, leaf.bind(store, base_model.config)) for c, leaf in terms]
        leaves = [(leaf.name, leaf) for _, leaf, _ in bound]
        if per_task:
            comps = [DeltaComponent(leaf.name, names, _leaf_delta_fn(leaf, store), cache) for _, leaf, names in bound]
            weights = [c for c, _, _ in bound]
        else:
            names = sorted({n for _, _, ns in bound for n in ns})
            label = " ".join(f"{c:+g}·{leaf.name}" for c, leaf, _ in bound)
            comps = [DeltaComponent(label, names, _combo_delta_fn([(c, leaf) for c, leaf, _ in bound], store), cache)]
            weights = [1.0]
        return cls(base_model, comps, weights, leaves, recipe=recipe, per_task=per_task, kind="linear",
                   leaf_weights=[c for c, _, _ in bound])

    # -------------------------------------------------------------- coefficients
    def coefs(self, lam: float, multipliers: Optional[Sequence[float]] = None) -> List[float]:
        """Coefficients of the components at scale ``lam`` (× per-component ``multipliers``)."""
        mult = list(multipliers) if multipliers is not None else [1.0] * len(self.components)
        return [lam * m * w for m, w in zip(mult, self.weights)]

    def leaf_space(self, i: int) -> "MergeSpace":
        """The space of task vector ``i`` alone (coefficient 1 gives its finetune), uncached."""
        label, leaf = self.leaves[i]
        store = self.base.store
        names = leaf.bind(store, self.base.config)
        comp = DeltaComponent(label, names, _leaf_delta_fn(leaf, store), cache=False)
        return MergeSpace(self.base, [comp], [1.0], [(label, leaf)])

    def warm(self, read_ahead: int = 2) -> None:
        """Fill the caches now (worker threads read and compute ahead)."""
        for comp in self.components:
            if not comp.cache:
                continue
            list(_prefetch(comp.names, comp.get, read_ahead))


def _prefetch(items: Sequence[str], fn: Callable[[str], Any], ahead: int = 2) -> Iterator[Tuple[str, Any]]:
    """``(item, fn(item))`` in order, computing up to ``ahead`` items in worker threads."""
    with ThreadPoolExecutor(max_workers=max(1, ahead)) as pool:
        pending: deque = deque()
        it = iter(items)
        for item in it:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= ahead:
                break
        while pending:
            item, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(fn, nxt)))
            yield item, fut.result()


# ------------------------------------------------------------------------------------ in place
_APPLY_BLOCK = 1 << 20  # elements: a 4 MB fp32 scratch stays in cache; no full-size temporaries


def _set_blockwise_(target: torch.Tensor, original: torch.Tensor, parts: Sequence[Tuple[float, torch.Tensor]],
                    scratch: torch.Tensor) -> torch.Tensor:
    """``target = dtype(θ0 + (c_1·δ_1 + c_2·δ_2 + ...))``: fp32 math, one rounding, block by block.

    One task: ``torch.add(θ0, δ, alpha=c, out=target)`` per block, a single fused pass (bf16 + fp32
    computes in fp32; 5x faster on CPU than separate multiply, add and cast passes). Several: the
    fp32 sum of the scaled deltas in a cache-sized scratch block, then the same fused add.
    ``original`` may be ``target`` itself (each block is read before it is written). Returns the
    scratch buffer for reuse.
    """
    if not target.is_contiguous():  # rare (no flat view): one full-size fp32 temporary
        (c0, d0), rest = parts[0], parts[1:]
        acc = d0.to(target.device) * c0
        for c, d in rest:
            acc.add_(d.to(target.device), alpha=c)
        target.copy_(acc.add_(original.to(target.device)))
        return scratch
    out, orig = target.view(-1), original.reshape(-1).to(target.device)
    (c0, d0), rest = (parts[0][0], parts[0][1].reshape(-1)), [(c, d.reshape(-1)) for c, d in parts[1:]]
    if rest and scratch.numel() < _APPLY_BLOCK:
        scratch = torch.empty(_APPLY_BLOCK, dtype=torch.float32, device=target.device)
    for i in range(0, out.numel(), _APPLY_BLOCK):
        j = min(out.numel(), i + _APPLY_BLOCK)
        if not rest:
            torch.add(orig[i:j], d0[i:j].to(target.device), alpha=c0, out=out[i:j])
            continue
        buf = scratch[: j - i]
        torch.mul(d0[i:j].to(target.device), c0, out=buf)
        for c, d in rest:
            buf.add_(d[i:j].to(target.device), alpha=c)
        torch.add(orig[i:j], buf, out=out[i:j])
    return scratch


class WeightBackup:
    """Exact originals of the tensors an :class:`InPlaceDelta` changes (shareable between patchers).

    ``restore="copy"``: a clone in the tensor's own dtype on ``device`` (default CPU), made the
    first time the tensor is changed. ``restore="reload"``: no copy; the base checkpoint tensor is
    re-read and cast to the model dtype, which is checked bitwise against the loaded value on first
    touch (a tensor that differs is copied instead).
    """

    def __init__(self, restore: str = "copy", device: Union[str, torch.device] = "cpu", store=None):
        if restore not in ("copy", "reload"):
            raise TaskArithError(f"restore: {restore!r} (use copy or reload)")
        if restore == "reload" and store is None:
            raise TaskArithError("restore='reload' needs the base checkpoint")
        self.restore = restore
        self.device = torch.device(device)
        self.store = store
        self._saved: Dict[str, Optional[torch.Tensor]] = {}

    def remember(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._saved:
            return
        if self.restore == "reload":
            disk = self.store.get(name).to(device=tensor.device, dtype=tensor.dtype)
            if torch.equal(disk, tensor):
                self._saved[name] = None
                return
            logger.info("%s: loaded value differs from the checkpoint; keeping a copy", name)
        self._saved[name] = tensor.detach().to(self.device, copy=True)

    def original(self, name: str, like: torch.Tensor) -> torch.Tensor:
        saved = self._saved[name]
        if saved is None:
            return self.store.get(name).to(dtype=like.dtype)
        return saved

    def saved_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._saved.values() if t is not None)


class InPlaceDelta:
    """Apply ``θ0 + Σ c_i·δ_i`` to a loaded model's weights in place, and revert exactly.

    Args:
        model: a ``torch.nn.Module`` holding the BASE weights (e.g. ``AutoModelForCausalLM``).
        source: a :class:`MergeSpace`, recipe, merge or ``TaskVector`` (with ``base``).
        base: the base reference, for a ``TaskVector`` source.
        restore: ``"copy"`` (default) or ``"reload"`` (see :class:`WeightBackup`).
        backup_device: where ``copy`` keeps originals (default CPU: no accelerator memory).
        backup: share another patcher's :class:`WeightBackup` (one copy for both).
        cache: cache fp32 deltas on CPU (for sources that are not a MergeSpace yet).
        per_task: one component per task vector (coefficients per task).

    ``apply(λ)`` scales the merge delta at λ = 1 (for a recipe: its weights with its
    lambda/alpha replaced by λ); ``apply([c_1, ..., c_n])`` sets each component's coefficient.
    """

    def __init__(self, model: torch.nn.Module, source, *, base=None, restore: str = "copy",
                 backup_device: Union[str, torch.device] = "cpu", backup: Optional[WeightBackup] = None,
                 cache: bool = True, per_task: bool = False):
        from .task_vector import match_name

        self.space = source if isinstance(source, MergeSpace) else MergeSpace.build(
            source, base=base, per_task=per_task, cache=cache)
        self.model = model
        self.backup = backup or WeightBackup(restore, backup_device, self.space.base.store)
        state = model.state_dict(keep_vars=True)
        keys = set(state)
        self._targets: Dict[str, torch.Tensor] = {}
        seen: Dict[Tuple[int, int], str] = {}
        for name in self.space.names:
            key = name if name in state else match_name(name, keys)
            if key is None:
                raise TaskArithError(
                    f"search: tensor {name!r} of the merge has no counterpart in the loaded "
                    f"{type(model).__name__} (is it the base model?)"
                )
            tensor = state[key].data if isinstance(state[key], torch.nn.Parameter) else state[key]
            ident = (tensor.data_ptr(), tensor.numel())
            if ident in seen:  # tied weights: one storage, changed once
                logger.debug("%s shares storage with %s; applied once", name, seen[ident])
                continue
            seen[ident] = name
            if tuple(tensor.shape) != tuple(self.space.base.store.shape(name)):
                raise TaskArithError(
                    f"search: tensor {name!r} is {list(tensor.shape)} in the model but "
                    f"{list(self.space.base.store.shape(name))} in the base checkpoint"
                )
            self._targets[name] = tensor
        self._dirty: List[str] = []
        self.applied: Optional[List[float]] = None

    def _coefs(self, coefs: Union[float, Sequence[float]]) -> List[float]:
        if isinstance(coefs, (int, float)):
            return self.space.coefs(float(coefs))
        coefs = [float(c) for c in coefs]
        if len(coefs) != len(self.space.components):
            raise TaskArithError(f"apply: {len(coefs)} coefficient(s) for {len(self.space.components)} component(s)")
        return coefs

    @torch.no_grad()
    def apply(self, coefs: Union[float, Sequence[float]]) -> None:
        """Set the weights to ``θ0 + Σ c_i·δ_i`` (fp32 math, one rounding to the model dtype).

        θ0 comes from the untouched weights or, for tensors changed by an earlier point, from the
        backup, so a search moves from point to point without a revert in between (with
        ``restore="copy"``; ``"reload"`` reverts first, since its originals are on disk).
        """
        if self.applied is not None and self.backup.restore != "copy":
            self.revert()
        cs = self._coefs(coefs)
        comps = [(c, comp) for c, comp in zip(cs, self.space.components) if c != 0.0]
        names = [n for n in self._targets if any(comp.touches(n) for _, comp in comps)] if comps else []
        previous = set(self._dirty)
        self.applied = cs

        def fetch(name: str):
            return [(c, delta) for c, comp in comps if (delta := comp.get(name)) is not None]

        scratch = torch.empty(0)
        try:
            for name, parts in _prefetch(names, fetch, ahead=2):
                if not parts:
                    continue
                target = self._targets[name]
                if name in previous:
                    original = self.backup.original(name, target)
                    previous.discard(name)
                else:
                    self.backup.remember(name, target)
                    self._dirty.append(name)
                    original = target
                if scratch.device != target.device:
                    scratch = torch.empty(0, device=target.device)
                scratch = _set_blockwise_(target, original, parts, scratch)
            for name in previous:  # changed at the last point, not at this one
                target = self._targets[name]
                target.copy_(self.backup.original(name, target))
        except BaseException:
            self.revert()
            raise

    @torch.no_grad()
    def revert(self) -> None:
        """Restore every changed tensor bitwise."""
        for name in self._dirty:
            target = self._targets[name]
            target.copy_(self.backup.original(name, target))
        self._dirty = []
        self.applied = None

    @contextlib.contextmanager
    def applied_at(self, coefs: Union[float, Sequence[float]]) -> Iterator[torch.nn.Module]:
        """``with patch.applied_at(0.4): ...`` applies, yields the model, reverts (also on errors)."""
        self.apply(coefs)
        try:
            yield self.model
        finally:
            self.revert()


@contextlib.contextmanager
def apply_scaled(model: torch.nn.Module, task_vector_or_merge, lam: Union[float, Sequence[float]], *, base=None,
                 restore: str = "copy", cache: bool = False) -> Iterator[torch.nn.Module]:
    """Context manager: the model holds ``θ0 + lam·τ`` inside the block, its exact original after.

    ``task_vector_or_merge``: a ``TaskVector`` (give ``base``), a ``MergedModel``, a
    ``MethodMerge``/recipe (``lam`` replaces its lambda/alpha) or a :class:`MergeSpace`. For
    repeated use build one :class:`InPlaceDelta` (it caches deltas).
    """
    patch = InPlaceDelta(model, task_vector_or_merge, base=base, restore=restore, cache=cache)
    with patch.applied_at(lam) as m:
        yield m


# ------------------------------------------------------------------------------------ search
@dataclass
class SearchResult:
    """Every evaluated point and the chosen coefficients. :meth:`save` writes JSON, table and plot."""

    rule: str
    val_tasks: List[str]
    control_tasks: List[str]
    grid: List[float]
    threshold: float
    labels: List[str]
    weights: List[float]
    scale_param: str
    base_scores: Dict[str, float]
    finetune_scores: Dict[str, float]
    task_map: Dict[str, str]
    points: List[Dict[str, Any]]
    best: Dict[str, Any]
    chosen: Dict[str, Any]
    metrics: Dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    coordinate: bool = False

    def to_dict(self) -> Dict[str, Any]:
        from .evaluation import jsonable

        return jsonable(self.__dict__)

    # ------------------------------------------------------------------ table
    def table(self) -> str:
        """Markdown: one row per evaluated point (the chosen one in bold)."""
        tasks = self.val_tasks + [t for t in self.control_tasks if t not in self.val_tasks]
        summary = "mean normalised" if self.rule == "addition" else "control ≥ bound"
        head = ["phase", self.scale_param, "coefficients", *tasks, summary, "objective"]
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for p in self.points:
            lam = "—" if p.get("lambda") is None else f"{p['lambda']:g}"
            coefs = ", ".join(f"{c:.3g}" for c in p["coefs"])
            scores = [f"{p['scores'][t]:.4f}" if t in p["scores"] else "—" for t in tasks]
            if self.rule == "addition":
                mn = p.get("mean_normalized")
                extra = f"{mn:.4f}" if mn is not None else "—"
            else:
                extra = ("yes" if p.get("feasible") else "no") + f" ({p.get('control_mean', float('nan')):.4f})"
            cells = [p["phase"], lam, coefs, *scores, extra, f"{p['objective']:.4f}"]
            if p is self.best or p.get("id") == self.best.get("id"):
                cells = [f"**{c}**" for c in cells]
            rows.append("| " + " | ".join(cells) + " |")
        return "\n".join(rows)

    def summary(self) -> str:
        chosen = ", ".join(f"{k}={v}" for k, v in self.chosen.items())
        return f"rule {self.rule}: chose {chosen} (objective {self.best['objective']:.4f}, {len(self.points)} points)"

    # ------------------------------------------------------------------ plot
    def plot(self, path: Union[str, os.PathLike]) -> Path:
        """PNG: accuracy of every task vs λ (lambda phase), the rule's curve and the choice."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        pts = sorted((p for p in self.points if p["phase"] == "lambda"), key=lambda p: p["lambda"])
        fig = Figure(figsize=(7, 4.5), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        xs = [p["lambda"] for p in pts]
        for t in self.val_tasks:
            ax.plot(xs, [p["scores"].get(t) for p in pts], marker="o", ms=3, label=f"{t} ({'target' if self.rule == 'negation' else 'val'})")
        for t in self.control_tasks:
            if t not in self.val_tasks:
                ax.plot(xs, [p["scores"].get(t) for p in pts], ls="--", marker="s", ms=3, label=f"{t} (control)")
        if self.rule == "addition":
            ys = [p.get("mean_normalized") for p in pts]
            ax.plot(xs, [y if y is not None else float("nan") for y in ys], color="black", lw=2, label="mean normalised")
        else:
            bound = self.best.get("control_bound")
            if bound is not None:
                ax.axhline(bound, color="grey", ls=":", label=f"control bound ({self.threshold:g}× base)")
        if self.best.get("lambda") is not None:
            ax.axvline(self.best["lambda"], color="red", ls="-.", lw=1, label=f"chosen {self.scale_param}={self.best['lambda']:g}")
        ax.set_xlabel(self.scale_param)
        ax.set_ylabel("validation accuracy")
        ax.set_title(f"{self.rule}: validation accuracy vs {self.scale_param}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
        return path

    def save(self, out_dir: Union[str, os.PathLike]) -> Dict[str, Path]:
        """Write ``search_results.json``, ``search_table.md`` and ``search_plot.png`` into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "search_results.json", "table": out / "search_table.md", "plot": out / "search_plot.png"}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        paths["table"].write_text(f"{self.summary()}\n\n{self.table()}\n")
        self.plot(paths["plot"])
        return paths


class _LmEvalScorer:
    """``(model, tasks) -> {task: score}`` through one reused lm-eval wrapper."""

    def __init__(self, model, tokenizer, *, batch_size, include_path, limit, split, metric, num_fewshot=None):
        from .evaluation import ModelEvaluator

        self.evaluator = ModelEvaluator(model, tokenizer, batch_size=batch_size, distributed=False)
        self.kw = dict(include_path=include_path, limit=limit, split=split, num_fewshot=num_fewshot, bootstrap_iters=0)
        self.metric = metric
        self.metrics: Dict[str, str] = {}

    def __call__(self, model, tasks: List[str]) -> Dict[str, float]:
        from .evaluation import primary_metric

        results = self.evaluator.run(tasks, **self.kw)
        if results is None:
            raise TaskArithError("search: runs in one process (results arrived on another rank)")
        out = {}
        for t in tasks:
            key, value = primary_metric(results["results"][t], self.metric)
            self.metrics.setdefault(t, key)
            out[t] = value
        return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _default_task_map(val_tasks: Sequence[str], leaves: Sequence[Tuple[str, Any]], weights: Sequence[float]) -> Dict[str, int]:
    from .evaluation import default_task_map

    names = [name for name, _ in leaves]
    by_name = default_task_map(val_tasks, names)
    if len(by_name) == len(val_tasks) and len(set(by_name.values())) == len(by_name):
        return {t: names.index(n) for t, n in by_name.items()}
    positive = [i for i, w in enumerate(weights) if w > 0] if len(weights) == len(leaves) else list(range(len(leaves)))
    if len(positive) == len(val_tasks):
        return dict(zip(val_tasks, positive))
    raise TaskArithError(
        "search: cannot tell which finetune belongs to which validation task; give a task map "
        f"(tasks {', '.join(val_tasks)}; task vectors {', '.join(f'{i}={n}' for i, n in enumerate(names))})"
    )


def _resolve_task_map(task_map, val_tasks, leaves, weights) -> Dict[str, int]:
    if not task_map:
        return _default_task_map(val_tasks, leaves, weights)
    names = [n for n, _ in leaves]
    out = {}
    for task, ref in task_map.items():
        if task not in val_tasks:
            raise TaskArithError(f"task map: {task!r} is not a validation task ({', '.join(val_tasks)})")
        if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
            idx = int(ref)
        elif ref in names:
            idx = names.index(ref)
        else:
            raise TaskArithError(f"task map: {ref!r} is neither an index nor a task vector name ({', '.join(names)})")
        if not 0 <= idx < len(leaves):
            raise TaskArithError(f"task map: index {idx} out of range (0..{len(leaves) - 1})")
        out[task] = idx
    return out


def search(
    source,
    val_tasks: Union[str, Sequence[str]],
    *,
    rule: str = "addition",
    grid: Union[str, Sequence[float], None] = DEFAULT_GRID,
    control_tasks: Union[str, Sequence[str], None] = None,
    threshold: float = 0.95,
    finetuned_scores: Optional[Mapping[str, float]] = None,
    task_map: Optional[Mapping[str, Union[int, str]]] = None,
    coordinate: bool = False,
    sweeps: int = 2,
    base=None,
    model: Optional[torch.nn.Module] = None,
    tokenizer=None,
    evaluate_fn: Optional[EvaluateFn] = None,
    limit: Union[int, float, None] = None,
    batch_size: Union[int, str] = 1,
    device: Optional[str] = "cpu",
    dtype=None,
    include_path=None,
    split: Optional[str] = "validation",
    metric: Optional[str] = None,
    num_fewshot: Optional[int] = None,
    cache: bool = True,
    restore: str = "copy",
) -> SearchResult:
    """Search the merge coefficient(s) on validation tasks, with the model in memory.

    Args:
        source: recipe path / ``Recipe``, ``MergedModel``/``MethodMerge``, or ``TaskVector`` (+ ``base``).
        val_tasks: the tasks scored (addition: the merged tasks; negation: the target tasks).
        rule: ``addition`` (max mean normalised accuracy) or ``negation`` (min target accuracy with
            control accuracy ≥ ``threshold`` × base control accuracy).
        grid: λ values (``"0:1:0.05"`` = the paper's grid, a comma list or numbers).
        control_tasks: negation's control tasks (also reported for addition).
        threshold: negation's fraction of the base control accuracy to keep.
        finetuned_scores: ``{task: accuracy of its own finetune}`` (addition); evaluated here
            (as θ0 + τ_i, on the same split) when missing.
        task_map: ``{task: task-vector index or name}`` (default: matching names, else the
            positive-weight task vectors in order).
        coordinate: after the λ sweep, search each task's weight on the grid (coordinate steps,
            ``sweeps`` passes; task_arithmetic / task vectors only).
        base: the base, for a ``TaskVector`` source.
        model, tokenizer: an already loaded base model (default: loaded once from the base).
        evaluate_fn: ``(model, tasks) -> {task: score}`` instead of lm-eval (for custom scoring).
        limit, batch_size, include_path, split, metric, num_fewshot: lm-eval settings.
        device, dtype: where and in which dtype the model runs (default dtype: the recipe's, else
            the checkpoint's).
        cache: cache fp32 deltas on CPU (else recompute per point; see the module docstring).
        restore: ``copy`` or ``reload`` (see :class:`WeightBackup`).

    Returns:
        A :class:`SearchResult` (``.chosen``: ``{"lambda": λ}`` or, with ``coordinate``,
        ``{"lambda": 1.0, "weights": [...]}``).
    """
    from .engine import parse_dtype, resolve_device
    from .evaluation import split_tasks

    from .evaluation import distributed_world_size

    start = time.time()
    if distributed_world_size() > 1:
        raise TaskArithError("search runs in one process: launch it without accelerate/torchrun (eval can use several)")
    if rule not in RULES:
        raise TaskArithError(f"rule: {rule!r} (use addition or negation)")
    vals = split_tasks(val_tasks)
    controls = split_tasks(control_tasks) if control_tasks else []
    if rule == "negation" and not controls:
        raise TaskArithError("search: the negation rule needs control tasks (accuracy to keep)")
    if not 0.0 <= threshold <= 1.5:
        raise TaskArithError(f"threshold: {threshold} (a fraction of the base control accuracy, e.g. 0.95)")
    points_grid = parse_grid(grid)
    all_tasks = vals + [t for t in controls if t not in vals]

    space = source if isinstance(source, MergeSpace) else MergeSpace.build(
        source, base=base, per_task=coordinate, cache=cache, device=None)
    if coordinate and not space.per_task and len(space.components) == 1 and len(space.leaves) > 1:
        raise TaskArithError("search: coordinate search needs a per-task MergeSpace")

    # -- the base model, once
    if model is None:
        from transformers import AutoModelForCausalLM

        want = parse_dtype(dtype if dtype is not None else getattr(space.recipe, "dtype", None))
        model = AutoModelForCausalLM.from_pretrained(str(space.base.path), dtype=want if want is not None else "auto")
        model.to(resolve_device(device)).eval()
    if evaluate_fn is None:
        if tokenizer is None:
            from .evaluation import _tokenizer_from
            from .refs import resolve

            tok_src = getattr(space.recipe, "tokenizer_source", None)
            tokenizer = _tokenizer_from(resolve(tok_src).path if tok_src else space.base.path)
        scorer = _LmEvalScorer(model, tokenizer, batch_size=batch_size, include_path=include_path, limit=limit,
                               split=split, metric=metric, num_fewshot=num_fewshot)
        evaluate_fn = scorer
    else:
        scorer = None

    patch = InPlaceDelta(model, space, restore=restore)
    if cache:
        space.warm()
        logger.info("cached fp32 deltas: %.1f MB", sum(c.cached_bytes() for c in space.components) / 2**20)

    def score(tasks: List[str]) -> Dict[str, float]:
        got = dict(evaluate_fn(model, list(tasks)))
        missing = [t for t in tasks if t not in got]
        if missing:
            raise TaskArithError(f"search: the evaluation returned no score for {', '.join(missing)}")
        return {t: float(got[t]) for t in tasks}

    # -- base (λ = 0) and finetunes
    base_scores = score(all_tasks)
    tmap: Dict[str, int] = {}
    ft_scores: Dict[str, float] = dict(finetuned_scores or {})
    if rule == "addition":
        missing = [t for t in vals if t not in ft_scores]
        if missing:
            tmap = _resolve_task_map(task_map, vals, space.leaves, space.leaf_weights)
            by_leaf: Dict[int, List[str]] = {}
            for t in missing:
                if t not in tmap:
                    raise TaskArithError(f"search: no finetune mapped to validation task {t!r}")
                by_leaf.setdefault(tmap[t], []).append(t)
            for idx, tasks in by_leaf.items():
                leaf_patch = InPlaceDelta(model, space.leaf_space(idx), backup=patch.backup)
                with leaf_patch.applied_at([1.0]):
                    ft_scores.update(score(tasks))
                logger.info("finetune %s: %s", space.leaves[idx][0], ft_scores)
    elif task_map:
        tmap = _resolve_task_map(task_map, vals, space.leaves, space.leaf_weights)

    if rule == "addition" and not any(ft_scores.get(t) for t in vals):
        logger.warning("search: every finetune scores 0 on its task: normalised accuracy is undefined, "
                       "ranking by mean accuracy instead")
    control_base = _mean([base_scores[t] for t in controls]) if controls else None
    bound = threshold * control_base if control_base is not None else None

    points: List[Dict[str, Any]] = []
    memo: Dict[Tuple[float, ...], Dict[str, Any]] = {}

    def evaluate_point(phase: str, lam: Optional[float], coefs: List[float], mult: Optional[List[float]]) -> Dict[str, Any]:
        key = tuple(round(c, 12) for c in coefs)
        if key in memo:  # a coordinate step back to a point already evaluated
            return memo[key]
        if all(c == 0.0 for c in coefs):
            scores = dict(base_scores)  # nothing applied: the base model itself
        else:
            patch.apply(coefs)  # from the originals: no revert needed between points (reverted at the end)
            scores = score(all_tasks)
        point = _point(phase, lam, coefs, mult, scores)
        memo[key] = point
        point["id"] = len(points)
        points.append(point)
        logger.info("%s %s: %s", phase, lam if lam is not None else coefs, point["objective"])
        return point

    def _point(phase, lam, coefs, mult, scores) -> Dict[str, Any]:
        p: Dict[str, Any] = {"phase": phase, "lambda": lam, "coefs": list(coefs), "scores": scores}
        if mult is not None:
            p["multipliers"] = list(mult)
        if rule == "addition":
            norm = {t: (scores[t] / ft_scores[t] if ft_scores.get(t) else None) for t in vals}
            defined = [v for v in norm.values() if v is not None]
            p["normalized"] = norm
            p["mean_normalized"] = _mean(defined) if defined else None
            p["objective"] = p["mean_normalized"] if defined else _mean([scores[t] for t in vals])
            p["rank"] = (p["objective"], _mean([scores[t] for t in vals]), -sum(abs(c) for c in coefs))
        else:
            target = _mean([scores[t] for t in vals])
            control = _mean([scores[t] for t in controls])
            feasible = control >= bound - 1e-12
            p.update(target_mean=target, control_mean=control, control_bound=bound, feasible=feasible)
            p["objective"] = target
            p["rank"] = (1 if feasible else 0, -target if feasible else control, control, -sum(abs(c) for c in coefs))
        if controls:
            p["control_mean"] = _mean([scores[t] for t in controls])
        return p

    try:
        best = None
        for lam in points_grid:
            p = evaluate_point("lambda", lam, space.coefs(lam), None)
            if best is None or p["rank"] > best["rank"]:
                best = p
        assert best is not None
        chosen: Dict[str, Any] = {space.scale_param: best["lambda"]}

        if coordinate:
            mult = [best["lambda"]] * len(space.components)
            current = best
            for sweep in range(max(1, sweeps)):
                changed = False
                for i in range(len(space.components)):
                    for g in points_grid:
                        if g == mult[i]:
                            continue
                        trial = list(mult)
                        trial[i] = g
                        p = evaluate_point("coordinate", None, space.coefs(1.0, trial), trial)
                        if p["rank"] > current["rank"]:
                            current, mult, changed = p, trial, True
                if not changed:
                    break
            best = current
            weights = space.coefs(1.0, mult)
            chosen = {space.scale_param: 1.0, "weights": weights}
            if best["phase"] == "coordinate":
                best["lambda"] = None

    finally:
        patch.revert()  # the model holds the base again, bitwise

    if rule == "negation" and not best.get("feasible"):
        logger.warning("search: no grid point keeps control accuracy >= %.4f; chose the best control accuracy", bound)
    for p in points:
        p.pop("rank", None)
    return SearchResult(
        rule=rule, val_tasks=vals, control_tasks=controls, grid=points_grid, threshold=threshold,
        labels=[c.label for c in space.components], weights=space.weights, scale_param=space.scale_param,
        base_scores=base_scores, finetune_scores=ft_scores,
        task_map={t: space.leaves[i][0] for t, i in tmap.items()},
        points=points, best=best, chosen=chosen, metrics=dict(scorer.metrics) if scorer else {},
        seconds=time.time() - start, coordinate=coordinate,
    )


# ------------------------------------------------------------------------------------ recipes
def write_recipe(recipe_source, result: Union[SearchResult, Mapping[str, Any]], path: Union[str, os.PathLike]) -> Path:
    """Write the recipe with the chosen coefficients (``parameters.lambda``/``alpha``, or task weights).

    A native YAML recipe is edited as data (comments aside, everything else is kept); relative
    local references are rewritten relative to the new file. A mergekit config or a ``Recipe``
    object is written as a native recipe.

    Returns:
        The written path (validated by loading it back).
    """
    import yaml

    from .recipe import Recipe, load_recipe

    chosen = result.chosen if isinstance(result, SearchResult) else dict(result.get("chosen", result))
    scale = next((k for k in ("lambda", "alpha") if k in chosen), "lambda")
    out = Path(path)
    header = "# written by hf-taskarith search"
    if isinstance(result, SearchResult):
        header += f": rule {result.rule}, validation tasks {', '.join(result.val_tasks)}"
        if result.control_tasks:
            header += f", control {', '.join(result.control_tasks)}"
    src_dir: Optional[Path] = None
    data: Dict[str, Any]
    if isinstance(recipe_source, Recipe):
        data = yaml.safe_load(recipe_source.to_yaml())
    else:
        src = Path(recipe_source)
        raw = yaml.safe_load(src.read_text())
        if not isinstance(raw, dict):
            raise TaskArithError(f"{src}: not a recipe")
        if "merge_method" in raw or "models" in raw:
            data = yaml.safe_load(load_recipe(src).to_yaml())  # native, absolute paths
        else:
            data = raw
            src_dir = src.resolve().parent
    params = data.setdefault("parameters", {}) or {}
    data["parameters"] = params
    params[scale] = float(chosen[scale])
    if "weights" in chosen:
        tasks = data.get("tasks") or []
        if len(tasks) != len(chosen["weights"]):
            raise TaskArithError(f"write_recipe: {len(chosen['weights'])} weights for {len(tasks)} task(s)")
        for task, w in zip(tasks, chosen["weights"]):
            task["weight"] = round(float(w), 10)
        if params.get("normalize"):
            params["normalize"] = False  # the weights written are the final coefficients
    if src_dir is not None:
        _rebase_refs(data, src_dir, out.resolve().parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + "\n" + yaml.safe_dump(data, sort_keys=False))
    load_recipe(out)
    return out


def _rebase_refs(data: Dict[str, Any], old: Path, new: Path) -> None:
    def fix(ref: Any) -> Any:
        if isinstance(ref, str) and ref.startswith(("./", "../")):
            target = (old / ref).resolve()
            rel = os.path.relpath(target, new)
            return rel if rel.startswith("../") else "./" + rel
        return ref

    for key in ("base", "tokenizer_source"):
        if key in data:
            data[key] = fix(data[key])
    for task in data.get("tasks") or []:
        for key in ("model", "adapter"):
            if key in task:
                task[key] = fix(task[key])
