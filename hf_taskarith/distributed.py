"""Multi-process merges: rank/world helpers, shard assignment and the collectives the engine needs.

A merge started by ``torchrun --nproc_per_node N -m hf_taskarith ...`` or
``accelerate launch --multi_gpu --num_processes N -m hf_taskarith ...`` runs in N processes that
each see ``WORLD_SIZE=N``. Every rank plans the same shards from the safetensors headers, writes
the shards assigned to it (:func:`assign_shards`) into one shared temp folder, and rank 0 writes
the index, config, tokenizer files and card and renames the folder into place.

A single process (``WORLD_SIZE`` unset or 1) never imports accelerate or touches
``torch.distributed``: :func:`get_context` returns a :class:`DistContext` whose collectives are
no-ops.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, List, Optional, Sequence, TypeVar

import torch

from .errors import TaskArithError

logger = logging.getLogger(__name__)
T = TypeVar("T")


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (torchrun and accelerate set it), 1 when unset."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def env_rank() -> int:
    """``RANK`` from the environment, 0 when unset (read without setting up the process group)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class DistContext:
    """Rank, world size and the few collectives a merge needs.

    Build it with :func:`get_context`. With ``world_size == 1`` every collective returns at once.

    Attributes:
        rank: This process's rank (0-based).
        world_size: Number of processes.
        device: The device this rank should compute on (``cuda:LOCAL_RANK`` for CUDA merges).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, device: Optional[torch.device] = None, state: Any = None):
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self._state = state

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the rank that writes shared files and renames the output)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def _comm_device(self) -> torch.device:
        import torch.distributed as dist

        # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks, in place (returned for convenience)."""
        if self.distributed:
            import torch.distributed as dist

            comm = tensor.to(self._comm_device())
            dist.all_reduce(comm, op=dist.ReduceOp.SUM)
            if comm is not tensor:
                tensor.copy_(comm)
        return tensor

    def any_true(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (also a barrier)."""
        if not self.distributed:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def sum_over_ranks(self, local: Optional[torch.Tensor], error: Optional[BaseException]) -> torch.Tensor:
        """Sum a CPU tensor of the same shape on every rank; if any rank had an error, raise on all.

        Args:
            local: This rank's part (``None`` when ``error`` is set).
            error: This rank's failure, if any.

        Raises:
            The rank's own error, or TaskArithError naming the other rank's failure.
        """
        self.raise_if_any_failed(error)
        return self.all_reduce_sum_(local)

    def raise_if_any_failed(self, error: Optional[BaseException]) -> None:
        """A collective check: raise ``error`` here, or a TaskArithError on ranks that had none."""
        if self.any_true(error is not None):
            if error is not None:
                raise error
            raise TaskArithError("distributed: another rank failed (see its error); stopping")

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only while the others wait; its result (or failure) reaches every rank.

        Used for small outputs (adapters, Hub pushes) that are not worth splitting.
        """
        if not self.distributed:
            return fn()
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except BaseException as err:
                error = err
        self.raise_if_any_failed(error)
        return self.broadcast_object(result)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (small picklable values only: names, paths, flags)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def shutdown(self) -> None:
        """Tear the process group down (clean exit under torchrun); a later merge sets it up again."""
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            if self._state is not None:
                type(self._state)._reset_state()  # PartialState is a singleton; forget the dead group


_SINGLE = DistContext()
_CONTEXT: Optional[DistContext] = None


def get_context(device: Optional[torch.device] = None) -> DistContext:
    """The process's :class:`DistContext`, initialising the process group on first use.

    Only when ``WORLD_SIZE > 1`` is accelerate's ``PartialState`` built (``cpu=True`` unless the
    merge runs on CUDA, so CPU ranks use gloo and GPU ranks NCCL, one GPU per local rank).

    Args:
        device: The device the merge asked for (``None``/cpu or cuda).

    Returns:
        The context (a no-op one in a single process).

    Raises:
        TaskArithError: if the process group cannot be set up.
    """
    global _CONTEXT
    if env_world_size() <= 1:
        return _SINGLE
    if _CONTEXT is not None:
        return _CONTEXT
    cuda = device is not None and torch.device(device).type == "cuda"
    try:
        from accelerate import PartialState

        state = PartialState(cpu=not cuda)
    except Exception as err:  # accelerate raises ValueError/RuntimeError on a bad launch environment
        raise TaskArithError(f"distributed: cannot initialise {env_world_size()} processes ({err})") from err
    dev = state.device if cuda else torch.device("cpu")
    _CONTEXT = DistContext(state.process_index, state.num_processes, dev, state)
    logger.info("rank %d of %d (backend %s, device %s)", _CONTEXT.rank, _CONTEXT.world_size, state.backend, dev)
    return _CONTEXT


def context_for_save(distributed: Optional[bool], device: Optional[torch.device] = None) -> DistContext:
    """The context a save runs under: split over ranks, or this process alone.

    Args:
        distributed: ``True``: split over the ranks of ``WORLD_SIZE`` (every rank must make the
            same call); ``False``: this process writes everything; ``None`` (auto): split when
            ``WORLD_SIZE > 1`` unless some other code already set up ``torch.distributed`` (e.g.
            an Accelerate training script, whose main process may be saving alone).
        device: The merge's device.

    Returns:
        The context (the no-op single-process one when not splitting).
    """
    if distributed is False or env_world_size() <= 1:
        return _SINGLE
    if distributed is None and _CONTEXT is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return _SINGLE
    return get_context(device)


def assign_shards(sizes: Sequence[int], world_size: int) -> List[List[int]]:
    """Split shard indices over ranks, balanced by bytes (largest first to the least-loaded rank).

    Deterministic: every rank computes the same assignment from the same sizes. Ties go to the
    lower rank, so equal shards go round-robin.

    Args:
        sizes: Bytes of each shard.
        world_size: Number of ranks.

    Returns:
        For each rank, its shard indices in ascending order (a rank may get none).
    """
    loads = [0] * world_size
    owned: List[List[int]] = [[] for _ in range(world_size)]
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owned[rank].append(index)
        loads[rank] += sizes[index]
    return [sorted(o) for o in owned]


def split_names(names: Sequence[str], rank: int, world_size: int) -> List[str]:
    """Every ``world_size``-th name starting at ``rank`` (for passes whose results are summed)."""
    return list(names[rank::world_size])


def shutdown() -> None:
    """Destroy the process group if this process set one up (a no-op in a single process)."""
    global _CONTEXT
    if _CONTEXT is not None:
        _CONTEXT.shutdown()
        _CONTEXT = None
