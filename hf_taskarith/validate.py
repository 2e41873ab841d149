"""``validate --resolve``: check that a recipe's inputs exist and fit, reading headers only.

Local folders and models already in the Hub cache are checked from their safetensors headers.
Hub models not in the cache are checked with huggingface_hub's safetensors-metadata calls,
which fetch the headers with range requests and download no weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from .checkpoint import ST_DTYPES, TensorInfo, TensorStore, open_checkpoint
from .errors import CheckpointError, ModelReferenceError
from .lora import LoraAdapter
from .recipe import Recipe
from .refs import META_PATTERNS, parse_ref
from .task_vector import DenseTaskVector, LoraTaskVector

logger = logging.getLogger(__name__)


class HeaderStore(TensorStore):
    """Names, shapes and dtypes only (from remote headers); reading data is an error."""

    def __init__(self, infos: Dict[str, TensorInfo], label: str):
        self._infos = infos
        self._label = label

    @property
    def label(self) -> str:
        return self._label

    @property
    def identity(self) -> str:
        return "hdr:" + self._label

    def keys(self) -> List[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"{self._label}: no tensor named {name!r}") from None

    def get(self, name: str):
        raise CheckpointError(f"{self._label}: header-only store cannot read {name!r}")


def _local_folder(ref: str, token) -> Optional[Path]:
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    repo_id, revision = parse_ref(ref)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=META_PATTERNS, token=token, local_files_only=True)
        )
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    if any(folder.glob("*.safetensors")):
        return folder
    return None


def _remote_headers(ref: str, filename: Optional[str], token) -> Tuple[HeaderStore, Dict[str, Any]]:
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    repo_id, revision = parse_ref(ref)
    api = HfApi()
    infos: Dict[str, TensorInfo] = {}
    try:
        if filename is None:
            meta = api.get_safetensors_metadata(repo_id, revision=revision, token=token)
            files = meta.files_metadata
        else:
            files = {filename: api.parse_safetensors_file_metadata(repo_id, filename, revision=revision, token=token)}
        config_name = "config.json" if filename is None else "adapter_config.json"
        config = json.loads(Path(hf_hub_download(repo_id, config_name, revision=revision, token=token)).read_text())
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        raise ModelReferenceError(f"{ref}: cannot read safetensors headers from the Hub (HTTP {status})") from None
    except Exception as err:  # offline, not found...
        raise ModelReferenceError(f"{ref}: cannot read safetensors headers ({type(err).__name__}: {err})") from None
    for fname, file_meta in files.items():
        for name, t in file_meta.tensors.items():
            dtype = ST_DTYPES[t.dtype]
            numel = 1
            for d in t.shape:
                numel *= d
            infos[name] = TensorInfo(name, tuple(t.shape), dtype, Path(fname), 0, numel * dtype.itemsize)
    return HeaderStore(infos, ref), config


def _open(ref: str, adapter: bool, token) -> Tuple[TensorStore, Dict[str, Any]]:
    folder = _local_folder(ref, token)
    config_name = "adapter_config.json" if adapter else "config.json"
    if folder is not None:
        store = open_checkpoint(folder, prefix="adapter_model" if adapter else "model")
        cfg_path = folder / config_name
        config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        return store, config
    if Path(ref).is_absolute() or ref.startswith("."):
        raise ModelReferenceError(f"local folder {ref!r} does not exist")
    return _remote_headers(ref, "adapter_model.safetensors" if adapter else None, token)


def resolve_check(recipe: Recipe, *, token: Union[str, bool, None] = None) -> List[str]:
    """Check every input exists and fits the base, from headers alone.

    Returns:
        One line per input describing what was checked.

    Raises:
        ModelReferenceError, CheckpointError, IncompatibleTensorsError, UnsupportedAdapterError.
    """
    base_ref = recipe.base or recipe.tasks[0].ref
    base_store, base_config = _open(base_ref, False, token)
    lines = [f"base {base_ref}: {len(base_store.keys())} tensors"]
    for task in recipe.tasks:
        if task.model is not None:
            store, config = _open(task.model, False, token)
            vector = DenseTaskVector(base_store, store, exclude=task.exclude, config=config, base_config=base_config)
        else:
            store, config = _open(task.adapter, True, token)
            vector = LoraTaskVector(LoraAdapter.build(config, store, task.adapter))
        touched = vector.bind(base_store, base_config)
        lines.append(f"{'model' if task.model else 'adapter'} {task.ref}: fits, changes {len(touched)} tensors")
    return lines
