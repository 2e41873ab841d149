"""Gradient task vectors: τ = −η Σ_b ∇L_b(θ0), every gradient taken at the base θ0.

"On Task Vectors and Gradients" (arXiv:2508.16082) shows that one epoch of full-batch gradient
descent gives exactly τ = −η ∇L(θ0), and that over several epochs the first-epoch gradient
dominates τ. This module computes that τ without training.

Definitions (``L_b`` is the causal-LM cross-entropy averaged over the scored tokens of batch ``b``,
which is what one optimizer step on that batch minimises, as in transformers' Trainer):

* ``batch_size=None`` (full batch, the *mean* form): one batch holding every example,
  τ = −η ∇ [Σ_tokens ℓ / N_tokens](θ0): exactly one full-batch GD step with learning rate η.
* ``batch_size=B`` (the *sum* form): consecutive batches of B examples in file order,
  τ = −η Σ_b ∇L_b(θ0): one epoch of SGD steps with every gradient taken at θ0 (the paper's
  first-order view of an epoch).

The result does not depend on how the work is split: each batch is cut into micro-batches of
``micro_batch_size`` examples (gradient accumulation, the memory knob), micro-batches are shared
round-robin between processes, each micro-batch's summed token loss is divided by its whole
batch's token count (known up front), and the per-process gradient sums are all-reduced once at
the end (a sum over ranks). No DDP wrapper is needed: θ never moves, so gradients are synchronised
once, not per step. Gradients are taken in eval mode (no dropout), so τ is deterministic.

Runs under Accelerate (``accelerate launch`` / ``torchrun`` / ``notebook_launcher``): process
count, rank and device come from ``accelerate.PartialState`` (or a given ``Accelerator``);
``mixed_precision="bf16"`` runs the forward pass under bf16 autocast with fp32 weights and fp32
gradient sums.

Data: JSONL, one object per line, with ``"text"`` (every token is scored) or ``"prompt"`` +
``"completion"`` (only completion tokens are scored; the two are tokenised separately and
concatenated, the prompt with the tokenizer's special tokens).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .errors import TaskArithError

if TYPE_CHECKING:
    from .stored import StoredTaskVector

logger = logging.getLogger(__name__)

IGNORE = -100


class DatasetError(TaskArithError):
    """A training-data file is missing, malformed or empty (the message names the file and line)."""


@dataclass(frozen=True)
class TokenizedExample:
    """One example: token ids and labels (``-100`` where the token is not scored)."""

    input_ids: Tuple[int, ...]
    labels: Tuple[int, ...]

    @property
    def scored_tokens(self) -> int:
        """Tokens that enter the causal-LM loss: labels shifted by one, ignoring -100."""
        return sum(1 for t in self.labels[1:] if t != IGNORE)


# --------------------------------------------------------------------------- data
def read_jsonl(path: Union[str, Path]) -> List[Dict[str, str]]:
    """Read a JSONL file of ``{"text": ...}`` or ``{"prompt": ..., "completion": ...}`` records.

    Blank lines are skipped. Extra fields are ignored.

    Returns:
        One dict per record, holding ``text`` or ``prompt`` and ``completion``.

    Raises:
        DatasetError: if the file is missing or empty, a line is not a JSON object, or a record
            lacks the fields or holds non-strings (the message names ``file:line``).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DatasetError(f"{path}: data file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: cannot read ({err})") from None
    records: List[Dict[str, str]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except ValueError as err:
            raise DatasetError(f"{where}: invalid JSON ({err})") from None
        if not isinstance(obj, dict):
            raise DatasetError(f"{where}: expected a JSON object, found {type(obj).__name__}")
        if "prompt" in obj or "completion" in obj:
            fields = ("prompt", "completion")
        elif "text" in obj:
            fields = ("text",)
        else:
            raise DatasetError(f"{where}: missing field 'text' (or 'prompt' and 'completion'); found {sorted(obj)}")
        record = {}
        for field in fields:
            if field not in obj:
                raise DatasetError(f"{where}: field {field!r} is missing (prompt and completion go together)")
            if not isinstance(obj[field], str):
                raise DatasetError(f"{where}: field {field!r} must be a string, found {type(obj[field]).__name__}")
            record[field] = obj[field]
        records.append(record)
    if not records:
        raise DatasetError(f"{path}: no examples (the file is empty)")
    return records


def tokenize_records(records: Sequence[Dict[str, str]], tokenizer, max_length: Optional[int] = None,
                     source: str = "<data>") -> List[TokenizedExample]:
    """Tokenise records for causal-LM loss (right-truncated to ``max_length`` tokens).

    Raises:
        DatasetError: if no example has a token to score.
    """
    out: List[TokenizedExample] = []
    truncated = 0
    for rec in records:
        if "text" in rec:
            ids = list(tokenizer(rec["text"])["input_ids"])
            labels = list(ids)
        else:
            prompt = list(tokenizer(rec["prompt"])["input_ids"])
            completion = list(tokenizer(rec["completion"], add_special_tokens=False)["input_ids"])
            ids = prompt + completion
            labels = [IGNORE] * len(prompt) + completion
        if max_length is not None and len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            truncated += 1
        out.append(TokenizedExample(tuple(ids), tuple(labels)))
    if truncated:
        logger.warning("%s: %d example(s) truncated to %d tokens", source, truncated, max_length)
    if sum(e.scored_tokens for e in out) == 0:
        raise DatasetError(f"{source}: no token to score (every example is too short or has an empty completion)")
    return out


def _collate(examples: Sequence[TokenizedExample], pad_id: int) -> Dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):  # right padding keeps real tokens at their positions
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def plan_micro_batches(n_examples: int, batch_size: Optional[int], micro_batch_size: int) -> List[Tuple[int, range]]:
    """``[(batch index, example range), ...]``: consecutive batches cut into micro-batches.

    ``batch_size=None`` is one batch of everything (the full-batch form).
    """
    if micro_batch_size < 1:
        raise TaskArithError(f"micro_batch_size must be at least 1, got {micro_batch_size}")
    if batch_size is not None and batch_size < 1:
        raise TaskArithError(f"batch_size must be at least 1 (or None for full batch), got {batch_size}")
    size = batch_size or n_examples
    plan = []
    for b, start in enumerate(range(0, n_examples, size)):
        stop = min(start + size, n_examples)
        for m in range(start, stop, micro_batch_size):
            plan.append((b, range(m, min(m + micro_batch_size, stop))))
    return plan


# --------------------------------------------------------------------------- gradient
def _select(names: Sequence[str], include: Optional[Sequence[str]], exclude: Optional[Sequence[str]]) -> List[str]:
    try:
        inc = [re.compile(p) for p in (include or [])]
        exc = [re.compile(p) for p in (exclude or [])]
    except re.error as err:
        raise TaskArithError(f"parameter pattern: invalid regular expression ({err})") from None
    return [n for n in names if (not inc or any(p.search(n) for p in inc)) and not any(p.search(n) for p in exc)]


def compute_gradient_task_vector(
    model_ref,
    data: Union[str, Path, Sequence[Dict[str, str]]],
    lr: float,
    *,
    batch_size: Optional[int] = None,
    micro_batch_size: int = 8,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    mixed_precision: str = "no",
    device: Union[str, torch.device, None] = None,
    max_length: Optional[int] = None,
    save_dir: Union[str, Path, None] = None,
    overwrite: bool = False,
    accelerator: Any = None,
    token: Union[str, bool, None] = None,
    progress: bool = False,
) -> "StoredTaskVector":
    """τ = −η Σ_b ∇L_b(θ0) (``batch_size=B``) or −η ∇L(θ0) over all data (``batch_size=None``).

    Args:
        model_ref: Base model: local folder, ``org/name[@rev]``, or an opened ``BaseModel``.
        data: JSONL file (``text`` or ``prompt``/``completion`` records) or the records themselves.
        lr: η, the learning rate of the step(s) τ stands for.
        batch_size: Examples per optimizer step across all processes; ``None`` = one full batch.
        micro_batch_size: Examples per forward/backward on one process (gradient accumulation).
        include: Regexes (``re.search`` on parameter names); only matching parameters get τ.
        exclude: Regexes of parameters kept out of τ (no gradient is computed for them).
        mixed_precision: ``"no"`` (fp32) or ``"bf16"`` (bf16 autocast forward, fp32 sums).
        device: Where the model runs (default: the Accelerate process's device).
        max_length: Truncate examples to this many tokens (default: the tokenizer's limit, if any).
        save_dir: Write τ as a task-vector folder here (main process), one tensor at a time, and
            return it read back lazily: host memory then never holds all of τ.
        overwrite: Replace a non-empty ``save_dir``.
        accelerator: An ``accelerate.Accelerator`` to run under (default: ``PartialState``).
        token: Hub token for the base.
        progress: Show a progress bar (main process).

    Returns:
        A :class:`~hf_taskarith.stored.StoredTaskVector` keyed by the base checkpoint's tensor
        names (fp32), with ``metadata`` recording how it was built. Every process gets it.

    Raises:
        DatasetError: for a missing, malformed or empty data file.
        TaskArithError: for bad options or patterns that select no parameter.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .engine import resolve_device
    from .stored import StoredTaskVector, write_task_vector_folder
    from .task_vector import BaseModel, match_name

    if mixed_precision not in ("no", "bf16"):
        raise TaskArithError(f"mixed_precision: {mixed_precision!r} (use 'no' or 'bf16')")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool):
        raise TaskArithError(f"lr: expected a number, got {lr!r}")
    base = BaseModel.coerce(model_ref, token=token)
    state = process_state(device, accelerator)
    dev = torch.device(state.device)
    if device is not None:
        want = resolve_device(device)
        if not (want.type == dev.type and want.index is None):  # "cuda" on rank r means the rank's GPU
            dev = want

    source = str(data) if isinstance(data, (str, Path)) else "<records>"
    records = read_jsonl(data) if isinstance(data, (str, Path)) else list(data)
    if not records:
        raise DatasetError(f"{source}: no examples")
    tokenizer = AutoTokenizer.from_pretrained(base.path, trust_remote_code=False)
    if max_length is None and 0 < (tokenizer.model_max_length or 0) < 10**8:
        max_length = int(tokenizer.model_max_length)
    examples = tokenize_records(records, tokenizer, max_length, source)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32, trust_remote_code=False)
    model.to(dev)
    model.eval()  # no dropout: the gradient at θ0 is deterministic

    # Map live parameters (tied ones under every name) to the base checkpoint's tensor names.
    base_keys = set(base.store.keys())
    by_param: Dict[int, Tuple[torch.nn.Parameter, List[str]]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        ckpt = match_name(name, base_keys)
        entry = by_param.setdefault(id(p), (p, []))
        if ckpt is not None and ckpt not in entry[1]:
            entry[1].append(ckpt)
    chosen = set(_select(sorted(base_keys), include, exclude))
    params: List[Tuple[torch.nn.Parameter, List[str]]] = []
    for p, names in by_param.values():
        keep = [n for n in names if n in chosen]
        p.requires_grad_(bool(keep))
        if keep:
            params.append((p, keep))
    if not params:
        raise TaskArithError(
            f"{base.resolved.display_name}: no parameter matches include={list(include or [])} "
            f"exclude={list(exclude or [])}"
        )

    plan = plan_micro_batches(len(examples), batch_size, micro_batch_size)
    tokens_per_batch: Dict[int, int] = {}
    for b, idx in plan:
        tokens_per_batch[b] = tokens_per_batch.get(b, 0) + sum(examples[i].scored_tokens for i in idx)
    mine = [(b, idx) for i, (b, idx) in enumerate(plan) if i % state.num_processes == state.process_index]

    from .engine import _progress

    bar = _progress(len(mine), "Gradient micro-batches", progress and state.is_main_process)
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    for b, idx in mine:
        if tokens_per_batch[b] == 0:
            bar.update(1)
            continue  # a batch with nothing to score has no gradient
        batch = {k: v.to(dev) for k, v in _collate([examples[i] for i in idx], pad_id).items()}
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16"):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        token_losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
            ignore_index=IGNORE, reduction="sum",
        )
        (token_losses / tokens_per_batch[b]).backward()
        loss_sum += token_losses.detach().double() / tokens_per_batch[b]
        bar.update(1)
    bar.close()

    multi = state.num_processes > 1
    if multi:
        from accelerate.utils import reduce

        loss_sum = reduce(loss_sum, reduction="sum")
    # Base file order; a tied parameter's names are yielded together (the writer takes this order).
    position = {n: i for i, n in enumerate(base.store.keys())}
    params.sort(key=lambda item: min(position[n] for n in item[1]))
    shapes = {n: tuple(p.shape) for p, names in params for n in names}

    def tau_stream():
        """τ one parameter at a time: all-reduce (every rank, same order), scale, move to CPU."""
        for p, names in params:
            g = p.grad if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
            if multi:
                g = reduce(g.float().contiguous(), reduction="sum")
            t = (g.float() * -float(lr)).cpu()
            p.grad = None  # free the device copy as we go
            for n in names:
                yield n, t

    n_batches = len(tokens_per_batch)
    metadata = {
        "kind": "gradient",
        "base": base.resolved.display_name,
        "base_commit": base.resolved.commit_sha,
        "lr": float(lr),
        "form": "full_batch_mean" if batch_size is None else "sum_over_batches",
        "batch_size": batch_size,
        "num_batches": n_batches,
        "num_examples": len(examples),
        "num_tokens": sum(tokens_per_batch.values()),
        "mean_loss": float(loss_sum) / n_batches,
        "mixed_precision": mixed_precision,
        "include": list(include or []),
        "exclude": list(exclude or []),
        "data": Path(data).name if isinstance(data, (str, Path)) else "<records>",
        "data_sha256": hashlib.sha256(Path(data).read_bytes()).hexdigest() if isinstance(data, (str, Path)) else None,
    }
    if save_dir is not None:
        # Streamed to disk: host memory holds one τ tensor at a time.
        if state.is_main_process:
            write_task_vector_folder(save_dir, tau_stream(), shapes, metadata, overwrite=overwrite)
        else:
            for _ in tau_stream():  # take part in every all-reduce
                pass
        del model
        state.wait_for_everyone()
        return StoredTaskVector.load(save_dir)
    tau = dict(tau_stream())
    del model
    label = f"<gradient task vector of {metadata['data']}>"
    return StoredTaskVector.from_tensors(tau, metadata, label=label)


class _SingleProcess:
    """The state of a plain (not launched) process: no accelerate global state is created, so a
    later ``notebook_launcher`` or ``Accelerator`` in the same process is not affected."""

    num_processes = 1
    process_index = 0
    is_main_process = True

    def __init__(self, device):
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))

    def wait_for_everyone(self) -> None:
        pass


def process_state(device=None, accelerator: Any = None):
    """Rank, world size and device: the given Accelerator's, accelerate's ``PartialState`` when
    launched with several processes (``WORLD_SIZE > 1``), else a single local process."""
    import os

    if accelerator is not None:
        return accelerator.state
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        world = 1
    if world <= 1:
        return _SingleProcess(device)
    from accelerate import PartialState

    cpu = (device is not None and torch.device(device).type == "cpu") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)
