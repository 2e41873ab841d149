"""Lazy, per-tensor access to checkpoints.

A :class:`Checkpoint` knows every tensor's name, shape and dtype from the safetensors
headers alone; data is read only when :meth:`Checkpoint.get` asks for one tensor.

Data is read with positioned reads into a fresh buffer rather than through one ``mmap`` of the
whole file: pages of a memory map stay in the process's resident set while the map is open, so
merging four 16 GB checkpoints through mmap would show 64 GB of RSS. Positioned reads keep memory
at the tensors in flight, and the file offsets come from the same header ``safetensors`` validates.
Code that reads its inputs once (the fused kernels) asks for :func:`mapped_reads`: large tensors
then come as a private map of just their own bytes, unmapped when the tensor is freed. That skips
a copy and, above all, the page faults of a fresh buffer, which cost ~6× the copy itself.

``.bin`` checkpoints are accepted only when a folder has no safetensors, and only through
``torch.load(weights_only=True)``, which refuses pickles that would run code.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch

from .errors import CheckpointError

logger = logging.getLogger(__name__)

# safetensors dtype codes <-> torch dtypes.
ST_DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, read from a header without touching data."""

    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


class TensorStore:
    """Read-only, per-tensor mapping of names to tensors (the interface all inputs share)."""

    def keys(self) -> List[str]:
        raise NotImplementedError

    def info(self, name: str) -> TensorInfo:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def __contains__(self, name: str) -> bool:
        return name in set(self.keys())

    def shape(self, name: str) -> Tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.info(name).dtype

    @property
    def identity(self) -> str:
        """A string that is equal for two stores reading the same weights."""
        return f"mem:{id(self)}"

    @property
    def label(self) -> str:
        """How errors name this store."""
        return "<in-memory state dict>"


def read_safetensors_header(path: Path) -> Tuple[Dict[str, TensorInfo], Dict[str, str]]:
    """Parse and validate a safetensors header.

    Returns:
        ``(tensors, metadata)``.

    Raises:
        CheckpointError: if the file is truncated or its header is corrupt (the message names the file).
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            header_len = int.from_bytes(raw_len, "little")
            if header_len <= 0 or header_len > _MAX_HEADER or 8 + header_len > size:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors file (header length {header_len}, file size {size})"
                )
            header_bytes = f.read(header_len)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror})") from None
    try:
        header = json.loads(header_bytes)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt safetensors header ({err})") from None
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors: Dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = ST_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has an invalid header entry {entry!r}") from None
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * dtype.itemsize
        if end - begin != nbytes or begin < 0:
            raise CheckpointError(
                f"{path}: tensor {name!r} header says {end - begin} bytes, shape {list(shape)} needs {nbytes}"
            )
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} ends at byte {data_start + end} but the file has {size} bytes"
            )
        tensors[name] = TensorInfo(name, shape, dtype, path, data_start + begin, nbytes)
    return tensors, metadata


class MappedWindow:
    """The pages of one mapped tensor: fill a byte range before reading it, drop it after.

    Readers that walk a big tensor range by range (the fused kernels) keep only the ranges in
    use resident, instead of the whole tensor (a 70B model's embeddings are 2 GB per input).
    Both calls are hints: on kernels without ``MADV_POPULATE_READ`` pages fault in on first read.
    """

    def __init__(self, m: mmap.mmap, delta: int):
        self._m = m
        self._delta = delta  # where the tensor's bytes start in the map

    def _pages(self, lo: int, hi: int) -> Tuple[int, int]:
        start = (self._delta + lo) // mmap.PAGESIZE * mmap.PAGESIZE
        return start, min(len(self._m), self._delta + hi) - start

    def populate(self, lo: int, hi: int) -> None:
        """Map bytes [lo, hi) of the tensor now (one call instead of a page fault per page)."""
        try:
            self._m.madvise(_MADV_POPULATE_READ, *self._pages(lo, hi))
        except (OSError, ValueError):
            pass

    def release(self, lo: int, hi: int) -> None:
        """Unmap bytes [lo, hi) from this process (the page cache keeps them; a read maps them again)."""
        try:
            self._m.madvise(mmap.MADV_DONTNEED, *self._pages(lo, hi))
        except (OSError, ValueError):
            pass


def mapped_window(tensor: torch.Tensor) -> Optional[MappedWindow]:
    """The :class:`MappedWindow` of a tensor returned under :func:`mapped_reads`, else ``None``."""
    return getattr(tensor, "_hf_taskarith_window", None)


class _FileReader:
    """Positioned reads on one file, shared by threads (os.pread has no file position)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: Optional[int] = None
        self._lock = threading.Lock()

    def map(self, offset: int, nbytes: int) -> Tuple[torch.Tensor, "MappedWindow"]:
        """A uint8 tensor over bytes [offset, offset + nbytes) of the file, as a private
        (copy-on-write) map, and the window that fills or drops its pages by range."""
        self._open()
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        m = mmap.mmap(
            self._fd, offset - start + nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=start,
        )
        return torch.frombuffer(m, dtype=torch.uint8, count=nbytes, offset=offset - start), MappedWindow(m, offset - start)

    def _open(self) -> None:
        if self._fd is None:
            with self._lock:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY)

    def read_into(self, buf: memoryview, offset: int) -> None:
        self._open()
        done = 0
        total = len(buf)
        while done < total:
            n = os.preadv(self._fd, [buf[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"{self.path}: unexpected end of file (truncated while reading)")
            done += n

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


_READ_TARGET = threading.local()
_VIEW_MIN_BYTES = 1 << 20  # smaller tensors are cheaper to copy than to map
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14


@contextmanager
def mapped_reads() -> Iterator[None]:
    """In this thread, let safetensors reads of large tensors return mapped views of the file.

    The map covers only that tensor's bytes, is private (a write copies the page, the file never
    changes) and is released with the tensor. For code that reads its inputs once (the fused
    kernels): no copy and no page faults on a fresh buffer. Its pages are mapped as they are read,
    or by range through :func:`mapped_window`.
    """
    previous = getattr(_READ_TARGET, "views", False)
    _READ_TARGET.views = True
    try:
        yield
    finally:
        _READ_TARGET.views = previous


@contextmanager
def reads_to_device(device: Optional[torch.device]) -> Iterator[None]:
    """In this thread, make safetensors reads return tensors already on a CUDA ``device``.

    Each read goes into a pinned host buffer and is copied with ``non_blocking=True`` on the
    current stream, so disk reads, copies and GPU math of different tensors overlap. ``None``
    (or a CPU device) leaves reads as they are.
    """
    previous = getattr(_READ_TARGET, "device", None)
    _READ_TARGET.device = device if device is not None and torch.device(device).type == "cuda" else None
    try:
        yield
    finally:
        _READ_TARGET.device = previous


class SafetensorsCheckpoint(TensorStore):
    """Lazy reader over one safetensors file or a sharded set with ``*.safetensors.index.json``.

    Args:
        files: The safetensors files making up the checkpoint.
        label: How errors name it (usually the folder).
    """

    def __init__(self, files: List[Path], label: str):
        self._label = label
        self._infos: Dict[str, TensorInfo] = {}
        self._readers: Dict[Path, _FileReader] = {}
        self.metadata: Dict[str, str] = {}
        for file in files:
            infos, metadata = read_safetensors_header(file)
            self.metadata.update(metadata)
            for name, info in infos.items():
                if name in self._infos:
                    raise CheckpointError(f"{label}: tensor {name!r} appears in two shards ({file.name})")
                self._infos[name] = info
            self._readers[file] = _FileReader(file)
        self._files = files
        self._identity: Optional[str] = None

    @property
    def files(self) -> List[Path]:
        return list(self._files)

    @property
    def label(self) -> str:
        return self._label

    @property
    def identity(self) -> str:
        if self._identity is None:  # resolved once: it is compared for every tensor of every input
            self._identity = "st:" + "|".join(str(f.resolve()) for f in self._files)
        return self._identity

    def keys(self) -> List[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"{self._label}: no tensor named {name!r}") from None

    def get(self, name: str) -> torch.Tensor:
        info = self.info(name)
        device = getattr(_READ_TARGET, "device", None)
        if device is None and info.nbytes >= _VIEW_MIN_BYTES and getattr(_READ_TARGET, "views", False):
            if info.offset % info.dtype.itemsize == 0:  # a typed view needs an aligned start
                raw, window = self._readers[info.file].map(info.offset, info.nbytes)
                tensor = raw.view(info.dtype).reshape(info.shape)
                tensor._hf_taskarith_window = window
                return tensor
        # Under reads_to_device (the engine's CUDA workers) the read lands in pinned memory so the
        # host-to-device copy is asynchronous; the caching host allocator keeps the buffer alive until it is done.
        out = torch.empty(info.nbytes, dtype=torch.uint8, pin_memory=device is not None)
        if info.nbytes:
            self._readers[info.file].read_into(memoryview(out.numpy()), info.offset)
        tensor = out.view(info.dtype).reshape(info.shape)
        return tensor if device is None else tensor.to(device, non_blocking=True)

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()


class StateDictStore(TensorStore):
    """A :class:`TensorStore` over tensors already in memory (a live model's ``state_dict()``)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], label: str = "<in-memory state dict>"):
        self._tensors = {k: v.detach() for k, v in tensors.items()}
        self._label = label

    @property
    def label(self) -> str:
        return self._label

    def keys(self) -> List[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def info(self, name: str) -> TensorInfo:
        try:
            t = self._tensors[name]
        except KeyError:
            raise CheckpointError(f"{self._label}: no tensor named {name!r}") from None
        return TensorInfo(name, tuple(t.shape), t.dtype, Path(self._label), 0, t.numel() * t.element_size())

    def get(self, name: str) -> torch.Tensor:
        self.info(name)
        return self._tensors[name].to("cpu", copy=True)  # callers may modify what they get


class PickleCheckpoint(StateDictStore):
    """A ``.bin`` checkpoint loaded with ``torch.load(weights_only=True, mmap=True)``."""

    def __init__(self, files: List[Path], label: str):
        tensors: Dict[str, torch.Tensor] = {}
        for file in files:
            tensors.update(_safe_torch_load(file))
        super().__init__(tensors, label)
        self._files = files

    @property
    def identity(self) -> str:
        return "bin:" + "|".join(str(f.resolve()) for f in self._files)


def _safe_torch_load(file: Path) -> Dict[str, torch.Tensor]:
    try:
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            obj = torch.load(file, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{file}: refused to load this pickle checkpoint safely (weights_only=True): {first}. "
            "Convert it to safetensors from a trusted environment."
        ) from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{file}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def _files_from_index(index: Path) -> List[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index}: invalid index file ({err})") from None
    files = []
    for shard in dict.fromkeys(weight_map.values()):
        path = index.parent / shard
        if not path.is_file():
            raise CheckpointError(f"{index}: shard {shard!r} listed in the index is missing")
        files.append(path)
    return files


def open_checkpoint(folder: Union[str, os.PathLike], prefix: str = "model") -> TensorStore:
    """Open the weights in a model folder lazily.

    Looks for ``{prefix}.safetensors.index.json``, then ``{prefix}.safetensors`` (or any
    ``*.safetensors``), and only then for pickle ``.bin`` files, with a warning.

    Args:
        folder: The model folder.
        prefix: File stem: ``model`` for models, ``adapter_model`` for PEFT adapters.

    Returns:
        A lazy :class:`TensorStore`.

    Raises:
        CheckpointError: if no weights are found or a file is corrupt.
    """
    folder = Path(folder)
    label = str(folder)
    index = folder / f"{prefix}.safetensors.index.json"
    if index.is_file():
        return SafetensorsCheckpoint(_files_from_index(index), label)
    single = folder / f"{prefix}.safetensors"
    if single.is_file():
        return SafetensorsCheckpoint([single], label)
    others = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if others and prefix == "model":
        return SafetensorsCheckpoint(others, label)
    bin_name = "pytorch_model" if prefix == "model" else prefix
    bin_index = folder / f"{bin_name}.bin.index.json"
    bins = _files_from_index(bin_index) if bin_index.is_file() else sorted(folder.glob(f"{bin_name}*.bin"))
    if bins:
        logger.warning(
            "%s: no safetensors weights; loading pickle .bin with torch.load(weights_only=True)", folder
        )
        return PickleCheckpoint(bins, label)
    raise CheckpointError(f"{folder}: no {prefix}.safetensors (or .bin) weights found")


def iter_in_file_order(store: TensorStore) -> Iterator[str]:
    """Names ordered by (file, offset), so reads go sequentially through each shard."""
    infos = [store.info(k) for k in store.keys()]
    infos.sort(key=lambda i: (str(i.file), i.offset))
    for info in infos:
        yield info.name
