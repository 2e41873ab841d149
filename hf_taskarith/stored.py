"""Task vectors stored as τ itself: the ``task_vector.safetensors`` folder format.

A gradient task vector (``TaskVector.from_gradient``) is not the difference of two checkpoints, so
it is kept as τ directly, in fp32 (θ0 + τ rounded to the model's dtype would lose a small τ). The
folder format, written by :meth:`StoredTaskVector.save` and ``hf-taskarith gradient --format vector``::

    DIR/task_vector.json           {"format": "hf_taskarith.task_vector", "version": 1, "base": ...,
                                    "base_commit": ..., "kind": "gradient", ...provenance}
    DIR/task_vector.safetensors    τ per changed base tensor, fp32, base tensor names
                                   (sharded as task_vector-00001-of-0000N.safetensors + index when large)

A stored τ is a normal leaf of the task-vector algebra: ``base + 0.5 * tv + ...`` merges it (the
engine reads one tensor at a time), and ``(1.0 * tv).apply_to(base).save_pretrained(...)`` writes
the finetuned model θ0 + τ in HF layout.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch

from .checkpoint import StateDictStore, TensorStore, open_checkpoint
from .errors import CheckpointError, IncompatibleTensorsError
from .refs import ResolvedModel
from .task_vector import LeafTaskVector, LinearPart, shape_error
from .writer import DEFAULT_MAX_SHARD_SIZE, PlannedTensor, ShardPlan, StreamingShardWriter, atomic_output_dir, parse_size

FORMAT = "hf_taskarith.task_vector"
META_FILE = "task_vector.json"
PREFIX = "task_vector"


def is_task_vector_folder(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a folder in the stored task-vector format."""
    return (Path(path) / META_FILE).is_file()


class StoredTaskVector(LeafTaskVector):
    """τ held as tensors (in memory or in a ``task_vector.safetensors`` folder), read per tensor.

    Args:
        store: τ by base tensor name (a lazy safetensors checkpoint or an in-memory store).
        metadata: Provenance (what built τ: ``kind``, learning rate, data, base...).
        source: The folder it was loaded from, if any.
    """

    def __init__(self, store: TensorStore, metadata: Optional[Mapping[str, Any]] = None,
                 source: Optional[ResolvedModel] = None):
        self.store = store
        self.metadata: Dict[str, Any] = dict(metadata or {})
        self.source = source
        self._bound: Dict[str, List[str]] = {}

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, Any]] = None,
                     label: str = "<in-memory task vector>") -> "StoredTaskVector":
        """τ from in-memory tensors (kept as given; fp32 recommended)."""
        return cls(StateDictStore(tensors, label), metadata)

    @classmethod
    def load(cls, folder: Union[str, Path]) -> "StoredTaskVector":
        """Open a stored task-vector folder lazily (headers only; tensors are read when used).

        Raises:
            CheckpointError: if ``task_vector.json`` or the tensors are missing or corrupt.
        """
        folder = Path(folder)
        meta_path = folder / META_FILE
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{folder}: not a task-vector folder ({META_FILE} is missing)") from None
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{meta_path}: unreadable ({err})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointError(f"{meta_path}: 'format' is not {FORMAT!r}")
        store = open_checkpoint(folder, prefix=PREFIX)
        return cls(store, meta, source=ResolvedModel(path=folder.resolve(), ref=str(folder)))

    # ---------------------------------------------------------------- leaf protocol
    display_name: Optional[str] = None  # how cards and tables name it (default: folder name or label)

    @property
    def name(self) -> str:
        return self.display_name or super().name

    @property
    def label(self) -> str:
        return self.store.label

    def keys(self) -> List[str]:
        return list(self.store.keys())

    def bind(self, base: TensorStore, base_config: Optional[Mapping[str, Any]] = None) -> List[str]:
        if base.identity in self._bound:
            return list(self._bound[base.identity])
        base_keys = set(base.keys())
        names = []
        for name in self.store.keys():
            if name not in base_keys:
                raise IncompatibleTensorsError(
                    f"{self.label}: tensor {name!r} of the task vector is not in the base {base.label}"
                )
            shape, want = tuple(self.store.shape(name)), tuple(base.shape(name))
            if shape != want:
                raise shape_error(self.label, name, shape, want)
            names.append(name)
        self._bound[base.identity] = sorted(names)
        return sorted(names)

    def linear_parts(self, name: str) -> List[LinearPart]:
        if name not in self.store:
            return []
        return [(1.0, self.store.identity, lambda: self.store.get(name))]

    # ---------------------------------------------------------------- saving
    def save(self, folder: Union[str, Path], *, overwrite: bool = False,
             max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE) -> Path:
        """Write τ (fp32) and its metadata as a task-vector folder, atomically, one tensor at a time.

        Raises:
            OutputExistsError: if the folder is non-empty and ``overwrite`` is False.
        """
        return write_task_vector_folder(
            folder, ((n, self.store.get(n)) for n in self.store.keys()),
            {n: tuple(self.store.shape(n)) for n in self.store.keys()}, self.metadata,
            overwrite=overwrite, max_shard_size=max_shard_size,
        )


def write_task_vector_folder(folder, tensors, shapes: Mapping[str, tuple], metadata: Mapping[str, Any], *,
                             overwrite: bool = False, max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Stream ``(name, tensor)`` pairs (in ``shapes`` order) into a task-vector folder, atomically.

    Tensors are written in fp32; non-finite values are refused (they would poison every merge).
    """
    planned = [PlannedTensor(n, tuple(s), torch.float32) for n, s in shapes.items()]
    plan = ShardPlan.build(planned, parse_size(max_shard_size), prefix=PREFIX)
    # All fp32: the plan keeps the given order (its per-shard sort is by itemsize), so tensors stream through.
    with atomic_output_dir(folder, overwrite) as tmp:
        writer = StreamingShardWriter(tmp, plan)
        try:
            for name, t in tensors:
                t = t.detach().to("cpu", torch.float32)
                if not bool(torch.isfinite(t).all()):
                    raise CheckpointError(f"task vector: tensor {name!r} has non-finite values (NaN/inf)")
                writer.write(name, t)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        meta = {"format": FORMAT, "version": 1, **{k: v for k, v in metadata.items() if k not in ("format", "version")}}
        (tmp / META_FILE).write_text(json.dumps(_jsonable(meta), indent=2, sort_keys=True) + "\n")
    return Path(folder).expanduser().resolve()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
