"""Task vectors and their lazy algebra.

A task vector is ``τ = θ_finetuned − θ_base`` per named tensor (for a LoRA adapter,
``τ = s·B@A`` per target module). Task vectors add, negate and scale like in the paper::

    merged = (0.4 * (tv_med + tv_code) - 0.5 * tv_toxic).apply_to("org/base")
    merged.save_pretrained("out")

Building an expression reads no tensor: it only records a linear combination of leaf task
vectors. Evaluation happens one tensor at a time when the result is saved or materialised.
"""

from __future__ import annotations

import json
import logging
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .checkpoint import StateDictStore, TensorStore, open_checkpoint
from .errors import IncompatibleTensorsError, TaskArithError
from .lora import PEFT_PREFIX, LoraAdapter, LoraModule
from .refs import ResolvedModel, resolve

if TYPE_CHECKING:
    from .merged import MergedModel

logger = logging.getLogger(__name__)

ModelLike = Union[str, "Path", ResolvedModel, "BaseModel"]
# One linear part of a leaf for one tensor: multiplier, identity of what is read, loader.
LinearPart = Tuple[float, str, Callable[[], torch.Tensor]]


def read_config(folder: Optional[Path]) -> Dict[str, Any]:
    if folder is None or not (Path(folder) / "config.json").is_file():
        return {}
    try:
        return json.loads((Path(folder) / "config.json").read_text())
    except ValueError:
        return {}


class BaseModel:
    """A base checkpoint opened lazily: resolved reference, config and tensor store.

    Args:
        ref: Local folder, ``org/name`` or ``org/name@revision``.
        token: Hub token (``None``: ``HF_TOKEN`` or the saved login).
    """

    def __init__(self, ref: Union[str, Path, ResolvedModel], token: Union[str, bool, None] = None):
        self.resolved = resolve(ref, token=token)
        self.store = open_checkpoint(self.resolved.path)
        self.config = read_config(self.resolved.path)

    @classmethod
    def coerce(cls, ref: ModelLike, token: Union[str, bool, None] = None) -> "BaseModel":
        return ref if isinstance(ref, BaseModel) else cls(ref, token=token)

    @property
    def path(self) -> Path:
        return self.resolved.path

    def __add__(self, other: "TaskVector") -> "MergedModel":
        if not isinstance(other, TaskVector):
            return NotImplemented
        return other.apply_to(self)

    def __sub__(self, other: "TaskVector") -> "MergedModel":
        if not isinstance(other, TaskVector):
            return NotImplemented
        return (-other).apply_to(self)


def _as_merged(obj) -> Optional["MergedModel"]:
    """``obj`` if it is an applied task-vector expression (a ``MergedModel``), else None."""
    from .merged import MergedModel

    return obj if isinstance(obj, MergedModel) else None


def match_name(name: str, base_keys: Iterable[str]) -> Optional[str]:
    """Map a tensor name from an adapter or state dict onto the base checkpoint's naming.

    Exact match first; otherwise a unique base key that ends with the name (or vice versa),
    which covers ``model.`` prefixes that differ between a bare and a headed model.
    """
    keys = base_keys if isinstance(base_keys, (set, dict)) else set(base_keys)
    if name in keys:
        return name
    hits = [k for k in keys if k.endswith("." + name) or name.endswith("." + k)]
    return hits[0] if len(hits) == 1 else None


def _vocab_hint(name: str) -> bool:
    return bool(re.search(r"(embed|wte|lm_head|word_embeddings|shared|output)", name))


class TaskVector(ABC):
    """Lazy linear combination of leaf task vectors (``Σ c_i τ_i``).

    Supports ``a + b``, ``a - b``, ``-a``, ``0.4 * a``, ``a / 2`` and ``sum([...])``.
    """

    # ------------------------------------------------------------------ constructors
    @staticmethod
    def from_models(
        base: ModelLike,
        finetuned: Union[str, Path, ResolvedModel],
        *,
        exclude: Optional[Sequence[str]] = None,
        token: Union[str, bool, None] = None,
    ) -> "DenseTaskVector":
        """τ = θ_finetuned − θ_base from two checkpoints (any transformers architecture).

        Args:
            base: The base model reference (or an opened :class:`BaseModel`).
            finetuned: The full finetune's reference.
            exclude: Regular expressions (``re.search`` on tensor names) kept out of τ, e.g.
                ``["^score\\.", "lm_head"]`` for classification heads.
            token: Hub token for private repos.

        Returns:
            A lazy task vector; nothing is read yet beyond headers.

        Raises:
            ModelReferenceError, CheckpointError: if either reference cannot be opened.
        """
        base_model = BaseModel.coerce(base, token=token)
        ft = resolve(finetuned, token=token)
        from .stored import StoredTaskVector, is_task_vector_folder

        if is_task_vector_folder(ft.path):  # τ saved on its own (e.g. `hf-taskarith gradient --format vector`)
            if exclude:
                raise TaskArithError(f"{ft.path}: a stored task vector takes no exclude patterns")
            return StoredTaskVector.load(ft.path)
        return DenseTaskVector(
            base_model.store,
            open_checkpoint(ft.path),
            exclude=exclude,
            source=ft,
            base_source=base_model.resolved,
            config=read_config(ft.path),
            base_config=base_model.config,
        )

    @staticmethod
    def from_adapter(
        adapter: Union[str, Path, ResolvedModel], *, token: Union[str, bool, None] = None
    ) -> "LoraTaskVector":
        """τ = s·B@A per target module of a PEFT LoRA adapter (rsLoRA, DoRA, patterns, Conv1D,
        embedding LoRA and ``modules_to_save`` included).

        Raises:
            UnsupportedAdapterError: for non-LoRA PEFT types or unsupported options.
            CheckpointError: if the adapter files are missing or corrupt.
        """
        resolved = resolve(adapter, token=token)
        return LoraTaskVector(LoraAdapter.from_folder(resolved.path), source=resolved)

    @staticmethod
    def from_state_dicts(
        base: Mapping[str, torch.Tensor],
        finetuned: Mapping[str, torch.Tensor],
        *,
        exclude: Optional[Sequence[str]] = None,
    ) -> "DenseTaskVector":
        """τ from two in-memory state dicts."""
        return DenseTaskVector(
            StateDictStore(base, "<base state dict>"),
            StateDictStore(finetuned, "<finetuned state dict>"),
            exclude=exclude,
        )

    @staticmethod
    def from_model(
        model: torch.nn.Module,
        base: ModelLike,
        *,
        exclude: Optional[Sequence[str]] = None,
        adapter_name: str = "default",
        token: Union[str, bool, None] = None,
    ) -> "TaskVector":
        """τ from a live model, without a disk round trip of the finetune.

        Use at the end of a training script, e.g.
        ``TaskVector.from_model(accelerator.unwrap_model(model), base="org/base")``.
        A ``peft.PeftModel`` gives a LoRA task vector; any other module a dense one.

        Args:
            model: The finetuned model (or PeftModel).
            base: The base it was trained from (reference or :class:`BaseModel`).
            exclude: Patterns kept out of a dense τ.
            adapter_name: Which adapter of a PeftModel.
            token: Hub token for the base.
        """
        base_model = BaseModel.coerce(base, token=token)
        try:
            from peft import PeftModel, get_peft_model_state_dict
        except ImportError:  # pragma: no cover - peft is a dependency
            PeftModel = ()  # type: ignore
        if PeftModel and isinstance(model, PeftModel):
            config = model.peft_config[adapter_name].to_dict()
            config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
            state = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()}
            adapter = LoraAdapter.from_state_dict(config, state, f"<PeftModel adapter {adapter_name!r}>")
            return LoraTaskVector(adapter)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        config = model.config.to_dict() if hasattr(model, "config") and hasattr(model.config, "to_dict") else {}
        return DenseTaskVector(
            base_model.store,
            StateDictStore(state, f"<in-memory {type(model).__name__}>"),
            exclude=exclude,
            base_source=base_model.resolved,
            config=config,
            base_config=base_model.config,
        )

    @staticmethod
    def from_gradient(model_ref: ModelLike, dataset: Any, lr: float, **kwargs: Any) -> "TaskVector":
        """τ = −η Σ_b ∇L_b(θ0) (or −η ∇L(θ0) full batch) without training; see :mod:`hf_taskarith.gradient`.

        Args:
            model_ref: The base model (reference or :class:`BaseModel`).
            dataset: A JSONL file of ``text`` or ``prompt``/``completion`` records (or the records).
            lr: η.
            **kwargs: ``batch_size`` (None: full batch), ``micro_batch_size``, ``include``,
                ``exclude``, ``mixed_precision``, ``device``, ``max_length``, ``save_dir``,
                ``accelerator``... of :func:`hf_taskarith.gradient.compute_gradient_task_vector`.

        Returns:
            A :class:`~hf_taskarith.stored.StoredTaskVector` (a normal leaf: it merges and saves).

        Raises:
            DatasetError: for a missing, malformed or empty data file.
        """
        from .gradient import compute_gradient_task_vector

        return compute_gradient_task_vector(model_ref, dataset, lr, **kwargs)

    # ------------------------------------------------------------------ algebra
    @abstractmethod
    def terms(self) -> List[Tuple[float, "LeafTaskVector"]]:
        """The expression flattened to ``[(coefficient, leaf), ...]`` with like leaves combined."""

    def __add__(self, other: Union["TaskVector", int]) -> "TaskVector":
        if isinstance(other, (int, float)) and other == 0:
            return self  # sum() starts from 0
        if not isinstance(other, TaskVector):
            return NotImplemented
        return LinearCombination(self.terms() + other.terms())

    def __radd__(self, other) -> Union["TaskVector", "MergedModel"]:
        merged = _as_merged(other)
        if merged is not None:  # (base + τ_a) + τ_b: extend the applied expression
            return type(merged)(merged.base, merged.expression + self)
        return self.__add__(other)

    def __rsub__(self, other) -> "MergedModel":
        merged = _as_merged(other)
        if merged is None:
            return NotImplemented
        return type(merged)(merged.base, merged.expression - self)

    def __neg__(self) -> "TaskVector":
        return LinearCombination([(-c, leaf) for c, leaf in self.terms()])

    def __sub__(self, other: "TaskVector") -> "TaskVector":
        if not isinstance(other, TaskVector):
            return NotImplemented
        return self + (-other)

    def __mul__(self, scale: float) -> "TaskVector":
        if not isinstance(scale, (int, float)) or isinstance(scale, bool):
            return NotImplemented
        return LinearCombination([(float(scale) * c, leaf) for c, leaf in self.terms()])

    __rmul__ = __mul__

    def __truediv__(self, scale: float) -> "TaskVector":
        if not isinstance(scale, (int, float)):
            return NotImplemented
        return self * (1.0 / scale)

    # ------------------------------------------------------------------ evaluation
    def apply_to(
        self,
        base: ModelLike,
        scaling_coef: float = 1.0,
        *,
        token: Union[str, bool, None] = None,
    ) -> "MergedModel":
        """θ = θ_base + scaling_coef · (this expression), lazily.

        Args:
            base: The base model (reference or :class:`BaseModel`).
            scaling_coef: λ of the paper.
            token: Hub token for the base.

        Returns:
            A :class:`~hf_taskarith.merged.MergedModel` to ``save_pretrained`` (streaming) or
            turn into an in-memory transformers model with ``to_model()``.

        Raises:
            IncompatibleTensorsError: if an input does not fit the base (checked from headers).
        """
        from .merged import MergedModel

        return MergedModel(BaseModel.coerce(base, token=token), self * scaling_coef)

    def delta(self, name: str, base: ModelLike) -> torch.Tensor:
        """Evaluate this expression's τ for one tensor, in fp32 (reads only that tensor)."""
        base_model = BaseModel.coerce(base)
        base_t = base_model.store.get(name).float()
        acc = torch.zeros_like(base_t)
        for coef, leaf in self.terms():
            leaf.bind(base_model.store)
            leaf.add_delta_(acc, name, coef, base_model.store, base_t)
        return acc

    def leaves(self) -> List["LeafTaskVector"]:
        return [leaf for _, leaf in self.terms()]

    def __repr__(self) -> str:
        parts = [f"{c:+g}·{leaf.name}" for c, leaf in self.terms()]
        return "TaskVector(" + " ".join(parts) + ")"


class LinearCombination(TaskVector):
    """``Σ c_i τ_i`` over leaves; created by the operators, never read tensors."""

    def __init__(self, terms: Iterable[Tuple[float, "LeafTaskVector"]]):
        combined: Dict[int, List[Any]] = {}
        for coef, leaf in terms:
            if id(leaf) in combined:
                combined[id(leaf)][0] += coef
            else:
                combined[id(leaf)] = [coef, leaf]
        self._terms = [(c, leaf) for c, leaf in combined.values() if c != 0.0]

    def terms(self) -> List[Tuple[float, "LeafTaskVector"]]:
        return list(self._terms)


class LeafTaskVector(TaskVector):
    """A task vector read from one source. Subclasses describe τ per base tensor."""

    source: Optional[ResolvedModel] = None

    def terms(self) -> List[Tuple[float, "LeafTaskVector"]]:
        return [(1.0, self)]

    @property
    def name(self) -> str:
        return self.source.display_name if self.source else self.label

    @property
    @abstractmethod
    def label(self) -> str:
        """How errors name this input."""

    @abstractmethod
    def bind(self, base: TensorStore, base_config: Optional[Mapping[str, Any]] = None) -> List[str]:
        """Check this τ against a base from headers alone; return the base tensors it changes.

        Raises:
            IncompatibleTensorsError: on shape mismatches, missing tensors, other architectures.
        """

    def linear_parts(self, name: str) -> List[LinearPart]:
        """Parts of τ[name] that are plain multiples of stored tensors (folded by the engine)."""
        return []

    def add_nonlinear_(
        self, acc: torch.Tensor, name: str, coef: float, base: TensorStore, base_tensor: torch.Tensor
    ) -> None:
        """``acc += coef · (the rest of τ[name])`` for parts that are not linear reads."""

    def needs_base_tensor(self, name: str, base: TensorStore) -> bool:
        """Whether :meth:`add_nonlinear_` reads the unmodified base tensor (DoRA, saved modules)."""
        return False

    def has_nonlinear(self, name: str, base: TensorStore) -> bool:
        """Whether :meth:`add_nonlinear_` adds anything to τ[name] (conservative: any override does)."""
        return type(self).add_nonlinear_ is not LeafTaskVector.add_nonlinear_

    def add_delta_(
        self, acc: torch.Tensor, name: str, coef: float, base: TensorStore, base_tensor: torch.Tensor
    ) -> None:
        """``acc += coef · τ[name]`` (fp32, on ``acc``'s device; no fp32 copy of a bf16 input)."""
        from .engine import add_scaled_

        for mult, identity, load in self.linear_parts(name):
            t = base_tensor if identity == base.identity else load().to(acc.device)
            add_scaled_(acc, t, coef * mult)
        self.add_nonlinear_(acc, name, coef, base, base_tensor)


class DenseTaskVector(LeafTaskVector):
    """τ = θ_finetuned − θ_base for a full finetune (lazy; per tensor).

    Use :meth:`TaskVector.from_models`, :meth:`TaskVector.from_model` or
    :meth:`TaskVector.from_state_dicts` to build one.
    """

    def __init__(
        self,
        base: TensorStore,
        finetuned: TensorStore,
        *,
        exclude: Optional[Sequence[str]] = None,
        source: Optional[ResolvedModel] = None,
        base_source: Optional[ResolvedModel] = None,
        config: Optional[Mapping[str, Any]] = None,
        base_config: Optional[Mapping[str, Any]] = None,
    ):
        self.base = base
        self.finetuned = finetuned
        self.exclude = [re.compile(p) for p in (exclude or [])]
        self.source = source
        self.base_source = base_source
        self.config = dict(config or {})
        self.base_config = dict(base_config or {})
        self._bound: Dict[str, set] = {}

    @property
    def label(self) -> str:
        return self.finetuned.label

    def excluded(self, name: str) -> bool:
        return any(p.search(name) for p in self.exclude)

    def bind(self, base: TensorStore, base_config: Optional[Mapping[str, Any]] = None) -> List[str]:
        if base.identity in self._bound:
            return sorted(self._bound[base.identity])
        check_architecture(self.label, self.config, base_config or self.base_config)
        ft_keys = set(self.finetuned.keys())
        own_keys = set(self.base.keys())
        touched = set()
        for name in base.keys():
            if not base.dtype(name).is_floating_point or self.excluded(name):
                continue
            for store in (self.finetuned, self.base):
                if name not in (ft_keys if store is self.finetuned else own_keys):
                    raise IncompatibleTensorsError(
                        f"{store.label}: tensor {name!r} of the base is missing "
                        f"(add an exclude pattern if it should stay as in the base)"
                    )
                shape, want = tuple(store.shape(name)), tuple(base.shape(name))
                if shape != want:
                    raise shape_error(store.label, name, shape, want)
            touched.add(name)
        extra = sorted(ft_keys - set(base.keys()))
        if extra:
            logger.warning(
                "%s: %d tensor(s) not in the base are ignored (e.g. %s)", self.label, len(extra), ", ".join(extra[:3])
            )
        self._bound[base.identity] = touched
        return sorted(touched)

    def linear_parts(self, name: str) -> List[LinearPart]:
        if self.excluded(name) or name not in self.finetuned:
            return []
        return [
            (1.0, self.finetuned.identity, lambda: self.finetuned.get(name)),
            (-1.0, self.base.identity, lambda: self.base.get(name)),
        ]


class LoraTaskVector(LeafTaskVector):
    """τ from a PEFT LoRA adapter (lazy; per target module). Build with :meth:`TaskVector.from_adapter`."""

    def __init__(self, adapter: LoraAdapter, source: Optional[ResolvedModel] = None):
        self.adapter = adapter
        self.source = source
        self._names: Dict[str, Dict[str, Tuple[Optional[LoraModule], Optional[str]]]] = {}

    @property
    def label(self) -> str:
        return self.adapter.label

    @property
    def config(self) -> Dict[str, Any]:
        return self.adapter.config

    def bind(self, base: TensorStore, base_config: Optional[Mapping[str, Any]] = None) -> List[str]:
        if base.identity in self._names:
            return sorted(self._names[base.identity])
        keys = set(base.keys())
        plan: Dict[str, Tuple[Optional[LoraModule], Optional[str]]] = {}

        def target(name: str, what: str) -> str:
            hit = match_name(name, keys)
            if hit is None:
                raise IncompatibleTensorsError(
                    f"{self.label}: {what} {name!r} has no matching tensor in the base {base.label} "
                    "(adapter trained on another model?)"
                )
            return hit

        for weight_name, mod in self.adapter.modules.items():
            hit = target(weight_name, "adapted module")
            shape, want = self.adapter.delta_shape(mod), tuple(base.shape(hit))
            if shape != want:
                raise IncompatibleTensorsError(
                    f"{self.label}: LoRA module {mod.module!r} gives a delta of shape {list(shape)} but the base "
                    f"{base.label} has {hit!r} of shape {list(want)} (adapter trained on another base?)"
                )
            plan[hit] = (mod, None)
        for name, key in self.adapter.full_tensors.items():
            hit = target(name, "saved tensor")
            shape, want = tuple(self.adapter.weights.shape(key)), tuple(base.shape(hit))
            if shape != want:
                raise shape_error(f"{self.label} ({key})", hit, shape, want)
            mod = plan.get(hit, (None, None))[0]
            plan[hit] = (mod, key)
        self._names[base.identity] = plan
        return sorted(plan)

    def _plan(self, base: TensorStore, name: str) -> Tuple[Optional[LoraModule], Optional[str]]:
        if base.identity not in self._names:
            self.bind(base)
        return self._names[base.identity].get(name, (None, None))

    def needs_base_tensor(self, name: str, base: TensorStore) -> bool:
        mod, full_key = self._plan(base, name)
        return full_key is not None or (mod is not None and mod.magnitude_key is not None)

    def has_nonlinear(self, name: str, base: TensorStore) -> bool:
        mod, full_key = self._plan(base, name)
        return mod is not None or full_key is not None

    def add_nonlinear_(self, acc, name, coef, base, base_tensor) -> None:
        mod, full_key = self._plan(base, name)
        w0 = base_tensor
        if full_key is not None:
            # The adapter stores the whole tensor (modules_to_save, bias, embedding base layer).
            saved = self.adapter.weights.get(full_key).to(acc.device, torch.float32)
            acc.add_(saved, alpha=coef)
            acc.sub_(base_tensor, alpha=coef)
            w0 = saved
        if mod is not None:
            self.adapter.add_lora_delta_(acc, mod, coef, w0)


def check_architecture(label: str, config: Mapping[str, Any], base_config: Mapping[str, Any]) -> None:
    """Refuse a finetune of another architecture (model_type differs)."""
    a, b = config.get("model_type"), base_config.get("model_type")
    if a and b and a != b:
        raise IncompatibleTensorsError(
            f"{label}: model_type {a!r} differs from the base's {b!r}; task vectors need the same architecture"
        )


def shape_error(label: str, name: str, shape: Tuple[int, ...], want: Tuple[int, ...]) -> IncompatibleTensorsError:
    if _vocab_hint(name) and len(shape) == len(want) and shape[1:] == want[1:] and shape[0] != want[0]:
        return IncompatibleTensorsError(
            f"{label}: tensor {name!r} has {shape[0]} rows but the base has {want[0]}: the vocabulary was resized. "
            f"Resize the base first (model.resize_token_embeddings({shape[0]}) and save it) and use that as the base, "
            f"or exclude the embedding and output layers from the task vector"
        )
    return IncompatibleTensorsError(
        f"{label}: shape mismatch for tensor {name!r}: {list(shape)} vs {list(want)} in the base"
    )
