"""PEFT LoRA adapters as per-tensor task vectors.

For a LoRA module with factors A (r x in) and B (out x r) the task vector is
``τ = s · B @ A`` with ``s = lora_alpha / r`` (rsLoRA: ``lora_alpha / sqrt(r)``), where
``rank_pattern`` / ``alpha_pattern`` override r and alpha per module (PEFT's matching rule).
Variants (formulas in ``shared/methods.md``):

* GPT-2 ``Conv1D`` (``fan_in_fan_out``): the stored weight is (in x out), so ``τ = s · (B @ A)ᵀ``.
* Embedding LoRA: ``lora_embedding_A`` (r x vocab), ``lora_embedding_B`` (dim x r): ``τ = s · (B @ A)ᵀ``.
* DoRA: ``W' = m ⊙ (W0 + s·BA) / ‖W0 + s·BA‖`` (row norms; column norms for embeddings), ``τ = W' − W0``.
* ``modules_to_save`` and trained biases: the adapter stores the whole tensor, ``τ = saved − base``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from .checkpoint import StateDictStore, TensorStore, open_checkpoint
from .errors import CheckpointError, IncompatibleTensorsError, UnsupportedAdapterError

PEFT_PREFIX = "base_model.model."

# Adapter options that change what the merged weights would be and that we do not model.
_UNSUPPORTED_OPTIONS = (
    "lora_bias",
    "trainable_token_indices",
    "layer_replication",
    "target_parameters",
    "use_qalora",
    "use_bdlora",
    "alora_invocation_tokens",
    "megatron_config",
    "use_kasa",
)


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` rule: a key matches a module name ending in it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass
class LoraModule:
    """One adapted module: its factors' tensor names and scaling."""

    module: str  # module path without the PEFT prefix, e.g. model.layers.0.self_attn.q_proj
    a_key: str
    b_key: str
    kind: str  # "linear" or "embedding"
    scaling: float
    rank: int
    fan_in_fan_out: bool = False
    magnitude_key: Optional[str] = None  # DoRA

    @property
    def weight_name(self) -> str:
        return self.module + ".weight"


@dataclass
class LoraAdapter:
    """A parsed PEFT LoRA adapter: config, lazy weights and the modules it changes.

    Build it with :meth:`from_folder` or :meth:`from_state_dict`.
    """

    config: Dict[str, Any]
    weights: TensorStore
    label: str
    modules: Dict[str, LoraModule] = field(default_factory=dict)  # weight name -> module
    full_tensors: Dict[str, str] = field(default_factory=dict)  # tensor name -> adapter key

    @classmethod
    def from_folder(cls, folder: Path) -> "LoraAdapter":
        """Read ``adapter_config.json`` and the adapter weights (lazily) from a folder.

        Raises:
            CheckpointError: if the config or weights are missing or corrupt.
            UnsupportedAdapterError: for a non-LoRA PEFT type or an unsupported option.
        """
        folder = Path(folder)
        config_path = folder / "adapter_config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{folder}: no adapter_config.json (is this a PEFT adapter folder?)")
        try:
            config = json.loads(config_path.read_text())
        except ValueError as err:
            raise CheckpointError(f"{config_path}: invalid JSON ({err})") from None
        return cls.build(config, open_checkpoint(folder, prefix="adapter_model"), str(folder))

    @classmethod
    def from_state_dict(cls, config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], label: str) -> "LoraAdapter":
        """Build from an in-memory config dict and PEFT-format state dict (``get_peft_model_state_dict``)."""
        return cls.build(dict(config), StateDictStore(state_dict, label), label)

    @classmethod
    def build(cls, config: Dict[str, Any], weights: TensorStore, label: str) -> "LoraAdapter":
        peft_type = getattr(config.get("peft_type"), "value", config.get("peft_type"))  # enum in live configs
        peft_type = str(peft_type or "").upper()
        if peft_type != "LORA":
            raise UnsupportedAdapterError(
                f"{label}: peft_type {config.get('peft_type')!r} is not supported; only LoRA adapters "
                "(including rsLoRA and DoRA) can be turned into task vectors"
            )
        for option in _UNSUPPORTED_OPTIONS:
            if config.get(option):
                raise UnsupportedAdapterError(
                    f"{label}: adapter option {option}={config[option]!r} is not supported"
                )
        adapter = cls(config=config, weights=weights, label=label)
        adapter._index()
        return adapter

    def _scaling(self, module: str, rank_in_file: int) -> Tuple[float, int]:
        cfg = self.config
        r = int(pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", 8)))
        alpha = float(pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8)))
        if r != rank_in_file:
            raise CheckpointError(
                f"{self.label}: module {module!r} has rank {rank_in_file} in the weights but r={r} in adapter_config.json"
            )
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        return scale, r

    def _index(self) -> None:
        factors: Dict[str, Dict[str, str]] = {}
        for key in self.weights.keys():
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            m = re.match(r"^(.*)\.(lora_A|lora_B)\.weight$", name) or re.match(
                r"^(.*)\.(lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(\.weight)?$", name
            )
            if m:
                factors.setdefault(m.group(1), {})[m.group(2)] = key
                continue
            if re.search(r"\.lora_[A-Za-z_]+", name):
                raise UnsupportedAdapterError(f"{self.label}: unsupported adapter tensor {key!r}")
            # A whole saved tensor: modules_to_save, trained biases, or a saved embedding base layer.
            name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name).replace(".base_layer.", ".")
            self.full_tensors[name] = key
        fif = bool(self.config.get("fan_in_fan_out"))
        for module, parts in factors.items():
            if "lora_A" in parts and "lora_B" in parts:
                a_key, b_key, kind = parts["lora_A"], parts["lora_B"], "linear"
            elif "lora_embedding_A" in parts and "lora_embedding_B" in parts:
                a_key, b_key, kind = parts["lora_embedding_A"], parts["lora_embedding_B"], "embedding"
            else:
                raise CheckpointError(f"{self.label}: module {module!r} lacks one of its LoRA factors ({sorted(parts)})")
            a_shape, b_shape = self.weights.shape(a_key), self.weights.shape(b_key)
            if len(a_shape) != 2 or len(b_shape) != 2:
                raise UnsupportedAdapterError(
                    f"{self.label}: LoRA on module {module!r} has {len(a_shape)}-D factors (convolutions are not supported)"
                )
            if a_shape[0] != b_shape[1]:
                raise CheckpointError(f"{self.label}: module {module!r}: lora_A {list(a_shape)} and lora_B {list(b_shape)} ranks differ")
            scale, rank = self._scaling(module, a_shape[0])
            self.modules[module + ".weight"] = LoraModule(
                module=module,
                a_key=a_key,
                b_key=b_key,
                kind=kind,
                scaling=scale,
                rank=rank,
                fan_in_fan_out=fif and kind == "linear",
                magnitude_key=parts.get("lora_magnitude_vector"),
            )

    # ----------------------------------------------------------------- shapes and deltas
    def delta_shape(self, mod: LoraModule) -> Tuple[int, ...]:
        """Shape of the base weight this module's τ applies to, from headers only."""
        a, b = self.weights.shape(mod.a_key), self.weights.shape(mod.b_key)
        if mod.kind == "embedding":
            return (a[1], b[0])  # (vocab, dim)
        return (a[1], b[0]) if mod.fan_in_fan_out else (b[0], a[1])

    def add_lora_delta_(
        self,
        acc: torch.Tensor,
        mod: LoraModule,
        coef: float,
        base_weight: Optional[torch.Tensor],
    ) -> None:
        """``acc += coef · τ`` for one module, fused (``addmm_``) where the variant allows.

        Args:
            acc: fp32 accumulator with the base weight's shape (stored orientation).
            mod: The module.
            coef: The term's coefficient.
            base_weight: fp32 base weight W0 (needed by DoRA only).
        """
        device = acc.device
        a = self.weights.get(mod.a_key).to(device=device, dtype=torch.float32)
        b = self.weights.get(mod.b_key).to(device=device, dtype=torch.float32)
        transposed = mod.kind == "embedding" or mod.fan_in_fan_out
        if mod.magnitude_key is None:
            if transposed:
                acc.addmm_(a.T, b.T, alpha=coef * mod.scaling)
            else:
                acc.addmm_(b, a, alpha=coef * mod.scaling)
            return
        if base_weight is None:
            raise ValueError("DoRA needs the base weight")
        magnitude = self.weights.get(mod.magnitude_key).to(device=device, dtype=torch.float32).reshape(-1)
        if mod.kind == "embedding":
            # Embedding DoRA normalises each embedding dimension (column of the vocab x dim matrix).
            merged = base_weight + mod.scaling * (a.T @ b.T)
            merged *= (magnitude / torch.linalg.norm(merged, dim=0)).view(1, -1)
            acc.add_(merged - base_weight, alpha=coef)
            return
        w0 = base_weight.T if mod.fan_in_fan_out else base_weight  # (out, in)
        merged = w0 + mod.scaling * (b @ a)
        merged *= (magnitude / torch.linalg.norm(merged, dim=1)).view(-1, 1)
        delta = merged - w0
        acc.add_(delta.T if mod.fan_in_fan_out else delta, alpha=coef)
