"""Writing PEFT LoRA adapter folders (adapter_config.json + adapter_model.safetensors), atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

import torch
from safetensors.torch import save_file

from .lora import PEFT_PREFIX
from .writer import atomic_output_dir, check_output_dir


def adapter_config(
    *,
    base_model: str,
    ranks: Dict[str, int],
    target_modules: Iterable[str],
    fan_in_fan_out: bool = False,
    modules_to_save: Optional[List[str]] = None,
    task_type: Optional[str] = "CAUSAL_LM",
) -> Dict[str, Any]:
    """A LoRA ``adapter_config.json`` with scaling 1 everywhere (``lora_alpha == r`` per module).

    The most common rank becomes ``r``; other modules get ``rank_pattern``/``alpha_pattern`` entries
    keyed by their full module path (PEFT matches ``(.*\\.)?(key)$``).
    """
    values = list(ranks.values()) or [1]
    r = max(set(values), key=values.count)
    pattern = {m: k for m, k in sorted(ranks.items()) if k != r}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(set(target_modules)),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": modules_to_save or None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def lora_keys(module: str, kind: str) -> tuple:
    """State-dict keys of a module's factors in PEFT's saved format."""
    if kind == "embedding":
        return f"{PEFT_PREFIX}{module}.lora_embedding_A", f"{PEFT_PREFIX}{module}.lora_embedding_B"
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


def write_adapter(
    out_dir: Union[str, Path],
    config: Dict[str, Any],
    tensors: Dict[str, torch.Tensor],
    *,
    dtype: Optional[torch.dtype] = None,
    overwrite: bool = False,
    inputs: Iterable[Path] = (),
    readme: Optional[str] = None,
) -> Path:
    """Write an adapter folder atomically (temp folder beside the target, then rename).

    Adapters are small (r·(in+out) per module), so the factors are collected and written at once.
    """
    target = check_output_dir(out_dir, overwrite, inputs)
    tensors = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in tensors.items()}
    with atomic_output_dir(target, overwrite) as tmp:
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if readme is not None:
            (tmp / "README.md").write_text(readme)
    return target
