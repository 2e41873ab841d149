"""The one streaming engine: base tensors in, per-tensor compute on a device, sharded writer out.

Every merge (task-vector algebra, merge methods) subclasses :class:`StreamingMerge` and
implements :meth:`StreamingMerge.compute` for one tensor. The engine owns everything else:
validation from headers, read-ahead (the next tensors are read and computed in worker threads
while the current one is written), the output dtype, sharding, atomic output and in-memory
materialisation.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import threading
from abc import ABC, abstractmethod
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch

from .errors import TaskArithError
from .refs import ResolvedModel, resolve
from .writer import (
    DEFAULT_MAX_SHARD_SIZE,
    BackgroundWriter,
    PlannedTensor,
    ShardPlan,
    StreamingShardWriter,
    atomic_output_dir,
    check_output_dir,
    commit_temp_dir,
    make_temp_dir,
    parse_size,
    write_index,
)

if TYPE_CHECKING:
    from .task_vector import BaseModel

logger = logging.getLogger(__name__)

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def parse_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    """``"bf16"``/``"bfloat16"``/``torch.bfloat16``… → ``torch.dtype`` (``None`` stays ``None``).

    Raises:
        TaskArithError: for anything but bf16, fp16 and fp32.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and dtype not in DTYPES.values():
            raise TaskArithError(f"dtype: {dtype} is not an output dtype (use bfloat16, float16 or float32)")
        return dtype
    try:
        return DTYPES[str(dtype).lower().replace("torch.", "")]
    except KeyError:
        raise TaskArithError(f"dtype: unknown dtype {dtype!r} (use bfloat16, float16 or float32)") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """``None``/``"cpu"``/``"cuda"``/``"cuda:1"`` → device, with a clear error if CUDA is absent."""
    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TaskArithError("device: CUDA was asked for but torch.cuda.is_available() is False")
    return dev


# Mixed-dtype elementwise ops on CPU convert the whole bf16/fp16 operand to an fp32 temporary first;
# blocks of this many elements bound that temporary to 16 MB. Results are the same element for element.
_BLOCK = 1 << 22


def _blocks(acc: torch.Tensor, x: torch.Tensor):
    if acc.device.type != "cpu" or x.dtype == acc.dtype or x.numel() <= _BLOCK or not acc.is_contiguous():
        return [(acc, x)]  # CUDA casts inside the kernel; same dtype needs no temporary
    a, b = acc.view(-1), x.reshape(-1)
    return [(a[i : i + _BLOCK], b[i : i + _BLOCK]) for i in range(0, a.numel(), _BLOCK)]


def add_scaled_(acc: torch.Tensor, x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``acc += alpha · x`` in ``acc``'s dtype, without a full-size fp32 copy of a bf16/fp16 ``x``.

    Args:
        acc: fp32 accumulator (modified in place).
        x: Same shape, any floating dtype, same device.
        alpha: Scale of ``x``.

    Returns:
        ``acc``.
    """
    for a, b in _blocks(acc, x):
        a.add_(b, alpha=alpha)
    return acc


def scale_into_(acc: torch.Tensor, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """``acc = alpha · x`` computed in ``acc``'s dtype, blockwise like :func:`add_scaled_`.

    (``torch.mul(x, alpha, out=acc)`` would compute in x's bf16 and round there first.)
    """
    for a, b in _blocks(acc, x):
        a.copy_(b)
        if alpha != 1.0:
            a.mul_(alpha)
    return acc


_MALLOC_FIXED = False


def fix_malloc_mmap_threshold() -> None:
    """Make glibc return every tensor-sized buffer to the OS when it is freed.

    glibc raises its mmap threshold to the size of each large block freed (up to 32 MB); after
    that, freed tensors stay in per-thread heaps and the resident set creeps up over a model (here
    +70 MB from 16 to 32 layers). A fixed 4 MB threshold (what ``MALLOC_MMAP_THRESHOLD_`` would set)
    keeps it flat. Once per process, Linux only, and not when the user set that variable.
    """
    global _MALLOC_FIXED
    if _MALLOC_FIXED:
        return
    _MALLOC_FIXED = True
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(-3, 4 << 20)  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # another libc: nothing to tune
        pass


class LazyTensor:
    """The base tensor of one name, read and converted to fp32 on first use only.

    A merge that does not need the base value (e.g. ``base + 1.0·τ`` folds it away) never reads it.
    ``get()`` returns a fresh fp32 tensor the caller may modify in place.
    """

    def __init__(
        self,
        load: Callable[[], torch.Tensor],
        shape: Tuple[int, ...],
        device: torch.device,
        out_dtype: Optional[torch.dtype] = None,
    ):
        self._load = load
        self.shape = tuple(shape)
        self.device = device
        self.out_dtype = out_dtype  # the dtype the result is written in (a kernel may round to it itself)
        self._value: Optional[torch.Tensor] = None

    def get(self) -> torch.Tensor:
        if self._value is None:
            self._value = self._load().to(device=self.device, dtype=torch.float32)
        return self._value

    def raw(self) -> torch.Tensor:
        """The base tensor as stored (its own dtype, on CPU), for kernels that read it directly."""
        return self._load()


class StreamingMerge(ABC):
    """A merge result evaluated tensor by tensor over a base checkpoint.

    Subclasses implement :meth:`compute` (and :meth:`validate`); saving, streaming and
    materialising are shared.
    """

    def __init__(self, base: "BaseModel"):
        self.base = base
        self._validated = False
        self._dist = None  # a DistContext while a multi-process save validates (splits global passes)
        self._device: Optional[torch.device] = None  # the device of the current save, for passes in validate()

    # ---------------------------------------------------------------- subclass API
    @abstractmethod
    def validate(self) -> None:
        """Check every input against the base from headers alone (raise on mismatch)."""

    @abstractmethod
    def compute(self, name: str, base: LazyTensor) -> torch.Tensor:
        """The merged value of one floating-point base tensor, in fp32 on ``base.device`` (or
        already rounded to ``base.out_dtype``, which is what the engine writes).

        ``base.get()`` reads the base tensor (fp32, a fresh copy the method may modify in place);
        methods that do not need it should not call it.
        """

    def inputs(self) -> List[ResolvedModel]:
        """Inputs other than the base (for provenance and model cards)."""
        return []

    def describe(self) -> Dict[str, Any]:
        """A JSON-able description of the merge, written beside the weights."""
        return {}

    # ---------------------------------------------------------------- engine
    def _ensure_valid(self) -> None:
        if not self._validated:
            self.validate()
            self._validated = True

    def output_dtype(self, dtype: Union[str, torch.dtype, None]) -> torch.dtype:
        parsed = parse_dtype(dtype)
        if parsed is not None:
            return parsed
        cfg = self.base.config
        for key in ("dtype", "torch_dtype"):
            if isinstance(cfg.get(key), str) and cfg[key] in DTYPES:
                return DTYPES[cfg[key]]
        store = self.base.store
        for name in store.keys():
            if store.dtype(name).is_floating_point and store.dtype(name) in DTYPES.values():
                return store.dtype(name)
        return torch.float32

    def plan(self, dtype: torch.dtype, max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE) -> ShardPlan:
        from .checkpoint import iter_in_file_order

        store = self.base.store
        tensors = []
        for name in iter_in_file_order(store):
            src = store.dtype(name)
            out = dtype if src.is_floating_point else src
            tensors.append(PlannedTensor(name, tuple(store.shape(name)), out))
        return ShardPlan.build(tensors, parse_size(max_shard_size))

    def _one(self, name: str, out_dtype: torch.dtype, device: torch.device, pinned: bool = False) -> torch.Tensor:
        store = self.base.store
        if not store.dtype(name).is_floating_point:
            return store.get(name)  # integer buffers are copied unchanged
        if device.type == "cuda":
            return self._one_cuda(name, out_dtype, device, pinned)
        merged = self.compute(name, LazyTensor(lambda: store.get(name), store.shape(name), device, out_dtype))
        return merged.to(dtype=out_dtype)

    def _one_cuda(self, name: str, out_dtype: torch.dtype, device: torch.device, pinned: bool) -> torch.Tensor:
        """One tensor on the GPU: pinned async reads in, math on this worker's stream, one sync out.

        Each read-ahead worker thread has its own CUDA stream, so one tensor's copies overlap
        another's math; the only synchronisation is the copy of the result back to host memory
        (pinned for the writer, which frees each tensor at once; pageable for callers that keep
        them, so a materialised model never pins the whole model's RAM).
        """
        from .checkpoint import reads_to_device

        store = self.base.store
        stream = _worker_stream(device)
        with torch.cuda.device(device), torch.cuda.stream(stream), reads_to_device(device):
            merged = self.compute(name, LazyTensor(lambda: store.get(name), store.shape(name), device))
            merged = merged.to(dtype=out_dtype)
            host = torch.empty(merged.shape, dtype=out_dtype, pin_memory=pinned)
            host.copy_(merged, non_blocking=True)
            stream.synchronize()
        return host

    def iter_tensors(
        self,
        dtype: Union[str, torch.dtype, None] = None,
        *,
        device: Union[str, torch.device, None] = None,
        order: Optional[List[str]] = None,
        read_ahead: int = 2,
        progress: bool = False,
        pinned: bool = False,
        downstream: Optional["BackgroundWriter"] = None,
    ) -> Iterator[Tuple[str, torch.Tensor]]:
        """Yield ``(name, merged tensor)`` one at a time, in the base's file order.

        At most ``read_ahead + 1`` tensors are being read, computed or held by the caller at any
        time: a new one is submitted only when the oldest is taken, so memory does not grow with
        the model. Tensors are also bounded by bytes: a tensor starts only while the outputs of
        the tensors in flight (plus what ``downstream`` still holds) stay within the largest output
        tensor and a quarter more, so the two biggest tensors (embeddings and ``lm_head``, often
        next to each other in a file) are never worked on at once and the peak does not depend on
        thread timing.

        Args:
            dtype: Output dtype for floating tensors (default: the base's).
            device: Where the math runs (``"cpu"``, ``"cuda"``); results are always on the CPU.
            order: Names in the order wanted (default: base file order).
            read_ahead: Tensors read and computed ahead in worker threads (bounds memory).
            progress: Show an HF-style progress bar.
            pinned: With CUDA, return results in pinned host memory (faster copies back; for
                consumers that drop each tensor soon, like the writer).
            downstream: The writer the results go to; the bytes it still holds count as in flight.
        """
        self._ensure_valid()
        fix_malloc_mmap_threshold()
        out_dtype = self.output_dtype(dtype)
        dev = resolve_device(device)
        if order is None:
            from .checkpoint import iter_in_file_order

            order = list(iter_in_file_order(self.base.store))
        bar = _progress(len(order), "Merging tensors", progress)
        workers = max(1, read_ahead)
        store = self.base.store
        size = {n: math.prod(store.shape(n)) * (out_dtype.itemsize if store.dtype(n).is_floating_point
                                                 else store.dtype(n).itemsize) for n in order}
        budget = max(size.values(), default=0)
        budget += budget // 4
        held = downstream.held_bytes if downstream is not None else (lambda: 0)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hf_taskarith-compute") as pool:
            pending: deque = deque()
            names = iter(order)
            nxt = next(names, None)
            try:
                while True:
                    while nxt is not None and len(pending) < workers:
                        busy = sum(size[n] for n, _ in pending) + held()
                        if busy and busy + size[nxt] > budget:
                            break
                        pending.append((nxt, pool.submit(self._one, nxt, out_dtype, dev, pinned)))
                        nxt = next(names, None)
                    if not pending:
                        if nxt is None:
                            break
                        downstream.wait_for_write()  # only the writer holds bytes: let it drain
                        continue
                    name, fut = pending.popleft()
                    result = fut.result()
                    bar.update(1)
                    yield name, result
                    del result
            finally:
                for _, fut in pending:
                    fut.cancel()  # on error or early exit, queued work is dropped, not run
        bar.close()

    def state_dict(self, dtype: Union[str, torch.dtype, None] = None, *, device=None) -> Dict[str, torch.Tensor]:
        """Materialise the merged weights in memory (CPU)."""
        return dict(self.iter_tensors(dtype, device=device))

    def save_pretrained(
        self,
        save_directory: Union[str, Path],
        *,
        dtype: Union[str, torch.dtype, None] = None,
        max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
        overwrite: bool = False,
        device: Union[str, torch.device, None] = None,
        tokenizer_source: Union[str, Path, ResolvedModel, None] = None,
        progress: bool = True,
        distributed: Optional[bool] = None,
    ) -> Path:
        """Stream the merged model to an HF-layout folder, atomically.

        Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE > 1``) every rank computes and
        writes its share of the shards and rank 0 finishes the folder; the bytes are those of a
        single-process save.

        Args:
            save_directory: Output folder. Built in a temp folder beside it, then renamed.
            dtype: ``bfloat16``/``float16``/``float32`` (default: the base's dtype). Math is fp32.
            max_shard_size: Shard size, e.g. ``"5GB"``; more than one shard writes an index.
            overwrite: Replace a non-empty folder.
            device: Where the math runs.
            tokenizer_source: Take tokenizer files from this model instead of the base.
            progress: Show a progress bar.
            distributed: Split the work over the ranks of a multi-process launch: ``None`` (auto)
                does when ``WORLD_SIZE > 1`` and no other code set up ``torch.distributed``;
                ``True`` always (every rank must call); ``False`` never (this process writes all).

        Returns:
            The output folder.

        Raises:
            OutputExistsError: if the folder is non-empty without ``overwrite``, or is an input.
            IncompatibleTensorsError: if an input does not fit the base.
        """
        from .distributed import context_for_save

        inputs = [self.base.path] + [r.path for r in self.inputs()]
        target = check_output_dir(save_directory, overwrite, inputs)
        dev = resolve_device(device)
        ctx = context_for_save(distributed, dev)
        if ctx.distributed and dev.type == "cuda" and dev.index is None:
            dev = ctx.device  # one GPU per local rank
        self._dist = ctx
        self._device = dev
        self._ensure_valid()
        out_dtype = self.output_dtype(dtype)
        plan = self.plan(out_dtype, max_shard_size)
        tok_dir = resolve(tokenizer_source).path if tokenizer_source is not None else self.base.path
        if ctx.distributed:
            self._save_distributed(ctx, target, plan, out_dtype, dev, tok_dir, progress)
        else:
            with atomic_output_dir(target, overwrite) as tmp:
                self._write_shards(tmp, plan, None, out_dtype, dev, progress)
                self._write_side_files(tmp, out_dtype, tok_dir)
        logger.info("Saved merged model to %s (%d shard(s))", target, len(plan.shards))
        self._saved_to = target
        return target

    def _write_shards(
        self, folder: Path, plan: ShardPlan, shards: Optional[List[int]], out_dtype: torch.dtype,
        device: torch.device, progress: bool,
    ) -> None:
        """Compute and write ``shards`` of ``plan`` (all, and the index, when ``None``) into ``folder``.

        Compute runs in the read-ahead workers, writing in a background thread behind a bounded
        queue, so reading, math and disk writes of different tensors overlap.
        """
        writer = BackgroundWriter(StreamingShardWriter(folder, plan, shards=shards), max_queued=2)
        order = [t.name for t in writer.writer.order()]
        tensors = self.iter_tensors(
            out_dtype, device=device, order=order, progress=progress, pinned=True, downstream=writer
        )
        try:
            for name, tensor in tensors:
                writer.put(name, tensor)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            tensors.close()  # on error: cancel queued reads now, not when the traceback is freed

    def _save_distributed(self, ctx, target: Path, plan: ShardPlan, out_dtype: torch.dtype, device: torch.device,
                          tok_dir: Path, progress: bool) -> None:
        """Each rank writes its shards into rank 0's temp folder; rank 0 finishes and renames.

        Every rank reports success or failure before rank 0 renames (an all-reduce of a failure
        flag), so an error on any rank leaves no output folder and is raised on every rank.
        """
        from .distributed import assign_shards

        error: Optional[BaseException] = None
        tmp: Optional[Path] = None
        if ctx.is_main:
            try:
                tmp = make_temp_dir(target)
            except BaseException as err:
                error = err
        shared = ctx.broadcast_object(str(tmp) if tmp is not None else None)
        if shared is None:
            raise error or TaskArithError(f"{target}: rank 0 could not create the temp folder")
        tmp = Path(shared)
        mine = assign_shards([sum(t.nbytes for t in shard) for shard in plan.shards], ctx.world_size)[ctx.rank]
        logger.info("rank %d writes %d of %d shard(s)", ctx.rank, len(mine), len(plan.shards))
        try:
            if mine:
                self._write_shards(tmp, plan, mine, out_dtype, device, progress and ctx.is_main)
        except BaseException as err:
            error = err
        failed = ctx.any_true(error is not None)
        if ctx.is_main:
            try:
                if not failed:
                    write_index(tmp, plan)
                    self._write_side_files(tmp, out_dtype, tok_dir)
                    commit_temp_dir(tmp, target)
            except BaseException as err:
                error = err
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        failed = ctx.any_true(error is not None)  # final barrier: nobody returns before the rename
        if error is not None:
            raise error
        if failed:
            raise TaskArithError(f"{target}: the merge failed on another rank (see its error); no output was written")

    def _write_side_files(self, folder: Path, dtype: torch.dtype, tokenizer_dir: Path) -> None:
        config = dict(self.base.config)
        if config:
            key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
            config[key] = dtype_name(dtype)
            if "torch_dtype" in config:
                config["torch_dtype"] = dtype_name(dtype)
            (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        gen = self.base.path / "generation_config.json"
        if gen.is_file():
            shutil.copy2(gen, folder / gen.name)
        for fname in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / fname
            if src.is_file():
                shutil.copy2(src, folder / fname)
        desc = self.describe()
        if desc:
            (folder / "hf_taskarith.json").write_text(json.dumps(desc, indent=2) + "\n")
            self.model_card().save(folder / "README.md")

    def recipe_dict(self) -> Dict[str, Any]:
        """The merge as a recipe, with inputs named by Hub id or folder name (never a local path)."""
        desc = self.describe()
        tasks = [
            {("adapter" if t.get("kind") == "adapter" else "model"): t["name"], "weight": t.get("weight")}
            for t in desc.get("tasks", [])
        ]
        out = {"base": desc.get("base"), "method": desc.get("method")}
        if desc.get("parameters"):
            out["parameters"] = desc["parameters"]
        out["tasks"] = tasks
        if desc.get("seed") is not None:
            out["seed"] = desc["seed"]
        return out

    def model_card(self, repo_id: Optional[str] = None, output_format: str = "model"):
        """This merge's ``huggingface_hub.ModelCard`` (see :func:`hf_taskarith.card.build_model_card`)."""
        import yaml

        from .card import build_model_card

        inputs = self.inputs()
        return build_model_card(
            self.describe(),
            base_path=self.base.path,
            input_paths=[r.path for r in inputs],
            base_repo_id=self.base.resolved.repo_id,
            input_repo_ids=[r.repo_id for r in inputs],
            output_format=output_format,
            recipe_yaml=yaml.safe_dump(self.recipe_dict(), sort_keys=False),
            eval_results=getattr(self, "eval_results", None),
            repo_id=repo_id,
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: Optional[bool] = None,
        commit_message: Optional[str] = None,
        revision: Optional[str] = None,
        create_pr: bool = False,
        token: Union[str, bool, None] = None,
        save_directory: Union[str, Path, None] = None,
        dtype: Union[str, torch.dtype, None] = None,
        max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
    ) -> str:
        """Save (if not saved yet) and upload the merge to the Hub in one commit, with its model card.

        Shaped like transformers' ``push_to_hub``. Returns the commit (or PR) URL.

        Raises:
            hf_taskarith.hub.PushError: with a clear reason on 401/403/404 or other failures.
        """
        import tempfile

        from .hub import push_folder

        folder = getattr(self, "_saved_to", None)
        with tempfile.TemporaryDirectory(prefix="hf_taskarith-push-") as tmp:
            if save_directory is not None or folder is None:
                folder = self.save_pretrained(
                    save_directory or Path(tmp) / "model", dtype=dtype, max_shard_size=max_shard_size,
                    overwrite=save_directory is None, progress=False,
                )
            self.model_card(repo_id).save(Path(folder) / "README.md")
            return push_folder(
                folder, repo_id, private=private, revision=revision, create_pr=create_pr,
                commit_message=commit_message, token=token,
            )

    def to_model(self, dtype: Union[str, torch.dtype, None] = None, *, device=None, model_class=None):
        """Materialise the merge as an in-memory transformers model (no disk round trip).

        Args:
            dtype: Parameter dtype (default: the base's).
            device: Where the merge math runs; the model is returned on CPU.
            model_class: transformers class to build (default: the base config's architecture).

        Returns:
            A ``transformers.PreTrainedModel`` in eval mode.
        """
        import transformers

        out_dtype = self.output_dtype(dtype)
        config = transformers.AutoConfig.from_pretrained(self.base.path)
        if model_class is None:
            arch = (getattr(config, "architectures", None) or [None])[0]
            model_class = getattr(transformers, arch, None) if arch else None
            if model_class is None:
                model_class = transformers.AutoModelForCausalLM
        if hasattr(model_class, "from_config"):
            model = model_class.from_config(config, dtype=out_dtype)
        else:
            model = model_class(config).to(out_dtype)
        state = self.state_dict(out_dtype, device=device)
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = set(getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or [])
        missing = [k for k in missing if k not in tied and not any(k.endswith(t) for t in tied)]
        if missing or unexpected:
            raise TaskArithError(
                f"{self.base.path}: merged weights do not fit {model_class.__name__}: "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        return model.eval()


_WORKER = threading.local()


def _worker_stream(device: torch.device) -> "torch.cuda.Stream":
    """This thread's own CUDA stream on ``device`` (created on first use)."""
    streams = getattr(_WORKER, "streams", None)
    if streams is None:
        streams = _WORKER.streams = {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in streams:
        streams[index] = torch.cuda.Stream(device=index)
    return streams[index]


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from huggingface_hub.utils import tqdm as hf_tqdm

    return hf_tqdm(total=total, desc=desc, unit="tensor")
