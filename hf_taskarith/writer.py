"""Streaming, atomic writer for HF-layout safetensors checkpoints.

The shard layout is planned up front from names, shapes and the output dtype (all known from
the base's headers), so each shard's header can be written first and tensors appended as they
are computed: memory holds the tensors in flight, never a whole shard. Files load with
``safetensors`` and ``transformers`` as usual (same header format, ``{"format": "pt"}``).

Outputs are built in a temp folder beside the target and renamed into place on success, so a
failure never leaves a half-written folder that looks valid.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import tempfile
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from .checkpoint import TORCH_TO_ST
from .errors import OutputExistsError, TaskArithError

DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3


def parse_size(size: Union[int, str]) -> int:
    """``"5GB"``, ``"500MB"``, ``"1GiB"`` or an int → bytes (transformers' convention: GB = 10⁹)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise TaskArithError(f"max_shard_size: cannot parse {size!r} (use e.g. 5GB, 500MB or a byte count)")
    value, unit = float(m.group(1)), (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(value * base**power)


@dataclass
class PlannedTensor:
    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass
class ShardPlan:
    """Which tensors go to which file, in write order."""

    shards: List[List[PlannedTensor]] = field(default_factory=list)
    prefix: str = "model"

    @classmethod
    def build(cls, tensors: Sequence[PlannedTensor], max_shard_size: int, prefix: str = "model") -> "ShardPlan":
        shards: List[List[PlannedTensor]] = [[]]
        size = 0
        for t in tensors:
            if shards[-1] and size + t.nbytes > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += t.nbytes
        # Within a shard, larger itemsizes first keep every tensor's offset aligned (as safetensors does).
        for shard in shards:
            shard.sort(key=lambda t: -t.dtype.itemsize)
        return cls(shards=shards, prefix=prefix)

    def file_name(self, index: int) -> str:
        if len(self.shards) == 1:
            return f"{self.prefix}.safetensors"
        return f"{self.prefix}-{index + 1:05d}-of-{len(self.shards):05d}.safetensors"

    def order(self) -> List[PlannedTensor]:
        return [t for shard in self.shards for t in shard]

    @property
    def total_size(self) -> int:
        return sum(t.nbytes for t in self.order())


def _header_bytes(shard: List[PlannedTensor], metadata: Dict[str, str]) -> bytes:
    header: Dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in shard:
        header[t.name] = {"dtype": TORCH_TO_ST[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


_WRITEBACK_MIN_BYTES = 8 << 20


class StreamingShardWriter:
    """Writes tensors in :class:`ShardPlan` order straight to their shard files.

    Args:
        folder: Destination folder (normally the temp folder of :func:`atomic_output_dir`).
        plan: The shard plan; :meth:`write` must receive tensors in ``plan.order()``.
        metadata: safetensors ``__metadata__`` (``{"format": "pt"}`` by default).
    """

    def __init__(
        self,
        folder: Path,
        plan: ShardPlan,
        metadata: Optional[Dict[str, str]] = None,
        shards: Optional[Sequence[int]] = None,
    ):
        self.folder = Path(folder)
        self.plan = plan
        self.metadata = metadata or {"format": "pt"}
        # A rank of a multi-process merge writes only its own shards; the index is rank 0's job.
        self.shards = list(range(len(plan.shards))) if shards is None else sorted(shards)
        self._writes_index = shards is None
        self._queue = iter([(i, t) for i in self.shards for t in plan.shards[i]])
        self._file = None
        self._file_index = -1

    def order(self) -> List[PlannedTensor]:
        """The tensors :meth:`write` expects, in order."""
        return [t for i in self.shards for t in self.plan.shards[i]]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        try:
            index, planned = next(self._queue)
        except StopIteration:
            raise TaskArithError(f"writer: unexpected extra tensor {name!r}") from None
        if planned.name != name or tuple(tensor.shape) != planned.shape or tensor.dtype != planned.dtype:
            raise TaskArithError(
                f"writer: expected {planned.name!r} {list(planned.shape)} {planned.dtype}, got {name!r} "
                f"{list(tensor.shape)} {tensor.dtype}"
            )
        if index != self._file_index:
            self._close_file()
            self._file = open(self.folder / self.plan.file_name(index), "wb")
            self._file.write(_header_bytes(self.plan.shards[index], self.metadata))
            self._file_index = index
        data = tensor.detach().cpu().contiguous().reshape(-1)
        if data.numel():
            start = self._file.tell()
            self._file.write(data.view(torch.uint8).numpy().data)
            if data.numel() * data.element_size() >= _WRITEBACK_MIN_BYTES and hasattr(os, "posix_fadvise"):
                # Start writing these pages to disk now, behind compute, so the fsync that closes
                # the shard waits for the tail only (Linux begins async writeback of a DONTNEED range).
                self._file.flush()
                os.posix_fadvise(self._file.fileno(), start, self._file.tell() - start, os.POSIX_FADV_DONTNEED)

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Finish the last shard and write the index when there is more than one shard."""
        leftover = next(self._queue, None)
        if leftover is not None:
            raise TaskArithError(f"writer: tensor {leftover[1].name!r} was never written")
        self._close_file()
        if self._writes_index:
            write_index(self.folder, self.plan)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_index(folder: Path, plan: ShardPlan) -> None:
    """Write ``{prefix}.safetensors.index.json`` when the plan has more than one shard."""
    if len(plan.shards) > 1:
        weight_map = {t.name: plan.file_name(i) for i, shard in enumerate(plan.shards) for t in shard}
        index = {"metadata": {"total_size": plan.total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (Path(folder) / f"{plan.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class BackgroundWriter:
    """Runs a :class:`StreamingShardWriter` in its own thread behind a bounded queue.

    Compute hands finished tensors to :meth:`put` and goes on; the thread writes them (and
    fsyncs each shard) meanwhile. The queue holds at most ``max_queued`` tensors, so a slow disk
    stalls compute instead of growing memory. An error in the thread is raised by the next
    :meth:`put` or by :meth:`close`.

    Args:
        writer: The writer to drive (tensors must arrive in ``writer.order()``).
        max_queued: Tensors waiting to be written at most.
    """

    _DONE = object()

    def __init__(self, writer: StreamingShardWriter, max_queued: int = 2):
        self.writer = writer
        self._queue: "queue.Queue" = queue.Queue(maxsize=max(1, max_queued))
        self._error: Optional[BaseException] = None
        self._held = 0  # bytes of tensors queued or being written
        self._written = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="hf_taskarith-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._DONE:
                return
            try:
                if self._error is None:  # after an error: drain, so put() never blocks on a dead writer
                    self.writer.write(*item)
            except BaseException as err:  # re-raised in the caller's thread
                self._error = err
            finally:
                with self._written:
                    self._held -= _nbytes(item[1])
                    self._written.notify_all()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor for writing (blocks while the queue is full)."""
        self._raise()
        with self._written:
            self._held += _nbytes(tensor)
        self._queue.put((name, tensor))

    def held_bytes(self) -> int:
        """Bytes of the tensors queued or being written."""
        return self._held

    def wait_for_write(self, timeout: float = 1.0) -> None:
        """Block until the thread finishes a tensor (or ``timeout`` seconds pass); raise its error."""
        with self._written:
            if self._held > 0:
                self._written.wait(timeout)
        self._raise()

    def close(self) -> None:
        """Wait for every queued tensor, finish the files; raise the thread's error if any."""
        self._queue.put(self._DONE)
        self._thread.join()
        self._raise()
        self.writer.close()

    def abort(self) -> None:
        """Stop the thread and close the open file (the caller removes the folder)."""
        if self._thread.is_alive():
            self._error = self._error or TaskArithError("writer: aborted")
            self._queue.put(self._DONE)
            self._thread.join()
        self.writer.abort()


def check_output_dir(target: Union[str, os.PathLike], overwrite: bool, inputs: Iterable[Path] = ()) -> Path:
    """Fail fast, before any work, if the output folder may not be written.

    Raises:
        OutputExistsError: if the target exists and is non-empty without ``overwrite``, is a
            file, or is (or contains) one of the inputs — overwriting it would lose data.
    """
    target = Path(target).expanduser().resolve()
    for src in inputs:
        src = Path(src).resolve()
        if src == target or target in src.parents:
            raise OutputExistsError(f"{target}: output folder is one of the inputs ({src}); choose another --out")
    if target.exists():
        if not target.is_dir():
            raise OutputExistsError(f"{target}: output path exists and is a file")
        if any(target.iterdir()) and not overwrite:
            raise OutputExistsError(f"{target}: output folder exists and is not empty (pass --overwrite / overwrite=True)")
    return target


@contextmanager
def atomic_output_dir(target: Union[str, os.PathLike], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``target``; on success it replaces ``target`` by rename.

    On any exception the temp folder is removed and ``target`` is left as it was.
    """
    target = check_output_dir(target, overwrite)
    tmp = make_temp_dir(target)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_temp_dir(tmp, target)


def make_temp_dir(target: Path) -> Path:
    """A fresh hidden temp folder beside ``target`` (same filesystem, so the final rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))


def commit_temp_dir(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``, replacing an existing ``target`` (moved aside, then removed)."""
    if target.exists():
        trash = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, trash)
        os.rename(tmp, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, target)
