"""``extract-lora``: turn a full finetune into a PEFT LoRA adapter by truncated SVD per module.

For every 2-D module weight, τ = θ_ft − θ_base is factored as τ ≈ B A with
``U S Vᵀ = svd(τ)``, ``B = U_r S_r^½``, ``A = S_r^½ V_rᵀ`` (scaling 1: ``lora_alpha = r``). The rank is
fixed (``rank``) or chosen per module as the smallest that keeps an ``energy`` fraction of Σ S²
(written as ``rank_pattern``). Module kinds come from the architecture built on the meta device
(no memory): ``nn.Linear``, GPT-2 ``Conv1D`` (``fan_in_fan_out``), ``nn.Embedding`` (optional,
``lora_embedding_A/B``). Changed norms and other small modules go to ``modules_to_save``, and
changed biases of adapted modules are saved with ``bias: all``, so at full rank the adapter
reproduces τ exactly. It streams tensor by tensor.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from .adapter_io import adapter_config, lora_keys, write_adapter
from .checkpoint import iter_in_file_order
from .errors import TaskArithError
from .lora import PEFT_PREFIX
from .refs import ResolvedModel, resolve
from .task_vector import BaseModel, TaskVector

logger = logging.getLogger(__name__)


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r with Σ_{i<r} S_i² ≥ energy · Σ S² (at least 1)."""
    power = singular_values.double().pow(2)
    total = float(power.sum())
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(power, 0) / total
    return int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=torch.float64))) + 1


def module_kinds(base: BaseModel) -> Dict[str, str]:
    """module path -> "linear" | "conv1d" | "embedding" | "other", from the architecture on meta."""
    import transformers
    from transformers.pytorch_utils import Conv1D

    config = transformers.AutoConfig.from_pretrained(base.path)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    cls = cls or transformers.AutoModelForCausalLM
    with torch.device("meta"):
        model = cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding):
            kinds[name] = "embedding"
        elif isinstance(module, Conv1D):
            kinds[name] = "conv1d"
        elif isinstance(module, torch.nn.Linear):
            kinds[name] = "linear"
        elif name:
            kinds[name] = "other"
    return kinds


def extract_lora(
    base: Union[str, Path, ResolvedModel, BaseModel],
    model: Union[str, Path, ResolvedModel],
    out_dir: Union[str, Path],
    *,
    rank: Optional[int] = 16,
    energy: Optional[float] = None,
    include_embeddings: bool = False,
    dtype: Optional[torch.dtype] = None,
    overwrite: bool = False,
    token: Union[str, bool, None] = None,
) -> Path:
    """Extract a LoRA adapter from a full finetune.

    Args:
        base: The base model.
        model: The full finetune.
        out_dir: Output adapter folder (atomic).
        rank: Rank per module (``None`` with ``energy``: chosen per module). Capped at min(out, in).
        energy: Keep the smallest rank holding this fraction of Σ S² (per module, ``rank_pattern``).
        include_embeddings: Also factor embedding matrices (``lora_embedding_A/B``).
        dtype: Adapter dtype (default fp32).
        overwrite: Replace a non-empty output folder.

    Returns:
        The adapter folder.

    Raises:
        IncompatibleTensorsError: if the finetune does not fit the base.
    """
    if rank is None and energy is None:
        raise TaskArithError("extract-lora: give a rank, an energy threshold, or both")
    if energy is not None and not 0 < energy <= 1:
        raise TaskArithError(f"extract-lora: energy must be in (0, 1], got {energy}")
    base_model = BaseModel.coerce(base, token=token)
    tv = TaskVector.from_models(base_model, model, token=token)
    tv.bind(base_model.store, base_model.config)
    kinds = module_kinds(base_model)
    store = base_model.store
    tensors: Dict[str, torch.Tensor] = {}
    ranks: Dict[str, int] = {}
    targets, save_modules, fif = [], set(), False
    lora_modules = set()
    for name in iter_in_file_order(store):
        if not store.dtype(name).is_floating_point:
            continue
        base_t = store.get(name).float()
        delta = torch.zeros_like(base_t)
        tv.add_delta_(delta, name, 1.0, store, base_t)
        if not torch.any(delta):
            continue
        module, _, param = name.rpartition(".")
        kind = kinds.get(module, "other")
        if param == "weight" and kind in ("linear", "conv1d") or (kind == "embedding" and include_embeddings):
            # math orientation: ΔW (out × in); Conv1D stores (in × out), embeddings ΔEᵀ = B A
            mat = delta.T if kind in ("conv1d", "embedding") else delta
            u, s, vh = torch.linalg.svd(mat, full_matrices=False)
            r = len(s) if rank is None else min(rank, len(s))
            if energy is not None:
                r = min(r, max(1, energy_rank(s, energy)))
            root = s[:r].sqrt()
            a_key, b_key = lora_keys(module, "embedding" if kind == "embedding" else "linear")
            tensors[a_key] = root[:, None] * vh[:r]
            tensors[b_key] = u[:, :r] * root[None, :]
            ranks[module] = r
            targets.append(module)
            lora_modules.add(module)
            fif = fif or kind == "conv1d"
        elif kind == "embedding":
            logger.warning("%s changed but embeddings are not extracted (use --embeddings)", name)
        else:
            save_modules.add(module)
    if fif and any(kinds.get(m) == "linear" for m in lora_modules):
        raise TaskArithError("extract-lora: a model mixing Conv1D and Linear modules cannot be one PEFT adapter")
    # Whole modules to save: every parameter of the module, as the finetune has it.
    bias_of_adapted = {m for m in save_modules if m in lora_modules}
    save_modules -= bias_of_adapted
    ft_store = tv.finetuned
    for name in store.keys():
        module, _, param = name.rpartition(".")
        if module in save_modules:
            tensors[PEFT_PREFIX + name] = ft_store.get(name).float()
        elif param == "bias" and module in lora_modules and bias_of_adapted:
            # PEFT wraps adapted modules: their own parameters live under `base_layer`.
            tensors[f"{PEFT_PREFIX}{module}.base_layer.bias"] = ft_store.get(name).float()
    config = adapter_config(
        base_model=base_model.resolved.display_name,
        ranks=ranks,
        target_modules=targets,
        fan_in_fan_out=fif,
        modules_to_save=sorted(save_modules),
    )
    if bias_of_adapted:
        config["bias"] = "all"
    return write_adapter(
        out_dir, config, tensors, dtype=dtype, overwrite=overwrite,
        inputs=[base_model.path] + ([tv.source.path] if tv.source else []),
    )
