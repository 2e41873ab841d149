"""Synthetic Llama checkpoints for the benchmarks, written shard by shard.

A checkpoint folder is laid out exactly as ``LlamaForCausalLM.save_pretrained`` would write it
(tensor names and order, ``model-0000i-of-0000n.safetensors`` shards planned by huggingface_hub's
own splitter, ``model.safetensors.index.json`` with ``metadata.total_size``, ``config.json`` and
``generation_config.json``), but no torch model is ever instantiated and at most one shard
(~1 GB) is held in memory.

Values:

* base: every matrix is ``0.02 * N(0, 1)``; RMSNorm weights are ones (as Llama initialises them);
* finetune ``k``: ``bf16(base + 0.002 * N(0, 1))`` with noise seeded per finetune, so that
  ``finetune - base`` is a realistic small dense delta.

Every tensor is drawn from its own generator seeded from ``(seed, tensor name)``, so values do not
depend on the shard layout and a finetune can recompute its base tensor without reading the base.

A finished folder holds a marker file (``.synth.json``) with the generation parameters; a folder
whose marker matches is reused as is. Folders are built under a temporary name and renamed into
place, so an interrupted generation never leaves a folder that looks complete.

CLI::

    python tests/bench/synth.py OUT_DIR [--layers N | --scale F] [--seed S] [--finetune-seed K]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from safetensors.torch import save_file

#: Bump when the generated values or layout change, so stale caches are regenerated.
SYNTH_VERSION = 1
MARKER = ".synth.json"

#: The "1x" benchmark model (~0.95B parameters, ~1.9 GB in bf16).
BASE_CONFIG = dict(
    hidden_size=2048,
    num_hidden_layers=16,
    intermediate_size=5632,
    vocab_size=32000,
    num_attention_heads=16,
    num_key_value_heads=16,
    tie_word_embeddings=False,
)
BASE_STD = 0.02
FINETUNE_NOISE = 0.002
DEFAULT_SHARD_SIZE = "1GB"

Spec = Tuple[Tuple[int, ...], str]  # (shape, kind) with kind "matrix" or "norm"


def layers_for_scale(scale: float) -> int:
    """Number of decoder layers for a model ``scale`` times the 1x benchmark model's depth."""
    return max(1, int(round(BASE_CONFIG["num_hidden_layers"] * scale)))


def llama_config(num_layers: int):
    """The ``LlamaConfig`` of the synthetic model (bf16, untied embeddings)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(**{**BASE_CONFIG, "num_hidden_layers": num_layers}, dtype="bfloat16")
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def tensor_specs(num_layers: int) -> Dict[str, Spec]:
    """Tensor name → (shape, kind), in the order ``LlamaForCausalLM.state_dict()`` lists them."""
    h = BASE_CONFIG["hidden_size"]
    i = BASE_CONFIG["intermediate_size"]
    v = BASE_CONFIG["vocab_size"]
    kv = h // BASE_CONFIG["num_attention_heads"] * BASE_CONFIG["num_key_value_heads"]
    specs: Dict[str, Spec] = {"model.embed_tokens.weight": ((v, h), "matrix")}
    for n in range(num_layers):
        p = f"model.layers.{n}."
        specs[p + "self_attn.q_proj.weight"] = ((h, h), "matrix")
        specs[p + "self_attn.k_proj.weight"] = ((kv, h), "matrix")
        specs[p + "self_attn.v_proj.weight"] = ((kv, h), "matrix")
        specs[p + "self_attn.o_proj.weight"] = ((h, h), "matrix")
        specs[p + "mlp.gate_proj.weight"] = ((i, h), "matrix")
        specs[p + "mlp.up_proj.weight"] = ((i, h), "matrix")
        specs[p + "mlp.down_proj.weight"] = ((h, i), "matrix")
        specs[p + "input_layernorm.weight"] = ((h,), "norm")
        specs[p + "post_attention_layernorm.weight"] = ((h,), "norm")
    specs["model.norm.weight"] = ((h,), "norm")
    specs["lm_head.weight"] = ((v, h), "matrix")
    return specs


def plan_shards(specs: Dict[str, Spec], max_shard_size: str = DEFAULT_SHARD_SIZE):
    """Shard plan from huggingface_hub's splitter (the one ``save_pretrained`` uses), on shapes only."""
    from huggingface_hub import split_state_dict_into_shards_factory

    def nbytes(spec: Spec) -> int:
        n = 2  # bf16
        for d in spec[0]:
            n *= d
        return n

    return split_state_dict_into_shards_factory(
        specs,
        get_storage_size=nbytes,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )


def _generator(seed: int, name: str) -> torch.Generator:
    """A generator seeded from ``(seed, name)``: values independent of shard layout."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def base_tensor(name: str, spec: Spec, seed: int) -> torch.Tensor:
    """The base model's value of one tensor (bf16)."""
    shape, kind = spec
    if kind == "norm":
        return torch.ones(shape, dtype=torch.bfloat16)
    t = torch.randn(shape, generator=_generator(seed, name), dtype=torch.bfloat16)
    return t.mul_(BASE_STD)


def finetune_tensor(name: str, spec: Spec, seed: int, finetune_seed: int) -> torch.Tensor:
    """A finetune's value of one tensor: ``bf16(base + 0.002·N(0,1))``, the sum in fp32."""
    out = base_tensor(name, spec, seed).float()
    noise = torch.randn(spec[0], generator=_generator(finetune_seed, "ft:" + name), dtype=torch.float32)
    out.add_(noise, alpha=FINETUNE_NOISE)
    del noise
    return out.to(torch.bfloat16)


def _marker(num_layers: int, seed: int, finetune_seed: Optional[int], max_shard_size: str) -> dict:
    return {
        "synth_version": SYNTH_VERSION,
        "config": {**BASE_CONFIG, "num_hidden_layers": num_layers},
        "seed": seed,
        "finetune_seed": finetune_seed,
        "base_std": BASE_STD,
        "finetune_noise": FINETUNE_NOISE if finetune_seed is not None else None,
        "max_shard_size": max_shard_size,
    }


def is_cached(out_dir: Path, marker: dict) -> bool:
    """True when ``out_dir`` was fully generated with exactly these parameters."""
    try:
        return json.loads((out_dir / MARKER).read_text()) == marker
    except (OSError, ValueError):
        return False


def generate(
    out_dir: os.PathLike,
    num_layers: int = BASE_CONFIG["num_hidden_layers"],
    seed: int = 0,
    finetune_seed: Optional[int] = None,
    max_shard_size: str = DEFAULT_SHARD_SIZE,
    force: bool = False,
    verbose: bool = True,
) -> Path:
    """Write a synthetic Llama checkpoint to ``out_dir`` (base, or a finetune when
    ``finetune_seed`` is given) and return its path; reuse it when its marker matches."""
    out_dir = Path(out_dir)
    marker = _marker(num_layers, seed, finetune_seed, max_shard_size)
    if not force and is_cached(out_dir, marker):
        if verbose:
            print(f"[synth] reuse {out_dir}", file=sys.stderr)
        return out_dir

    t0 = time.perf_counter()
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    specs = tensor_specs(num_layers)
    split = plan_shards(specs, max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        shard = {}
        for name in names:
            if finetune_seed is None:
                shard[name] = base_tensor(name, specs[name], seed)
            else:
                shard[name] = finetune_tensor(name, specs[name], seed, finetune_seed)
        save_file(shard, str(tmp / filename), metadata={"format": "pt"})
        del shard
        gc.collect()

    if split.is_sharded:
        n_params = sum(torch.Size(s[0]).numel() for s in specs.values())
        index = {
            "metadata": {"total_parameters": n_params, **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    cfg = llama_config(num_layers)
    cfg.save_pretrained(tmp)
    from transformers import GenerationConfig

    GenerationConfig.from_model_config(cfg).save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")

    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    if verbose:
        size = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
        print(
            f"[synth] wrote {out_dir} ({size / 1e9:.2f} GB, {len(split.filename_to_tensors)} shards) "
            f"in {time.perf_counter() - t0:.1f}s",
            file=sys.stderr,
        )
    return out_dir


def suite_paths(root: os.PathLike, num_layers: int, n_finetunes: int = 3) -> Tuple[Path, List[Path]]:
    """Where ``ensure_suite`` puts the base and finetunes: ``root/L{num_layers}/{base,ft1,...}``."""
    root = Path(root) / f"L{num_layers}"
    return root / "base", [root / f"ft{k}" for k in range(1, n_finetunes + 1)]


def suite_is_cached(root: os.PathLike, num_layers: int, n_finetunes: int = 3, seed: int = 0) -> bool:
    """True when ``ensure_suite`` would generate nothing."""
    base, fts = suite_paths(root, num_layers, n_finetunes)
    return is_cached(base, _marker(num_layers, seed, None, DEFAULT_SHARD_SIZE)) and all(
        is_cached(ft, _marker(num_layers, seed, 1000 + k, DEFAULT_SHARD_SIZE)) for k, ft in enumerate(fts, 1)
    )


def ensure_suite(
    root: os.PathLike, num_layers: int = BASE_CONFIG["num_hidden_layers"], n_finetunes: int = 3, seed: int = 0
) -> Tuple[Path, List[Path]]:
    """Base plus ``n_finetunes`` finetunes (noise seeds 1001, 1002, ...) under ``root/L{num_layers}/``,
    generated unless cached; returns (base, [ft1, ...])."""
    base, fts = suite_paths(root, num_layers, n_finetunes)
    generate(base, num_layers, seed=seed)
    for k, ft in enumerate(fts, 1):
        generate(ft, num_layers, seed=seed, finetune_seed=1000 + k)
    return base, fts


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output folder")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--layers", type=int, help=f"decoder layers (default {BASE_CONFIG['num_hidden_layers']})")
    g.add_argument("--scale", type=float, help="depth relative to the 1x model, e.g. 2 → 32 layers")
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument("--finetune-seed", type=int, default=None, help="write a finetune of the base with this noise seed")
    p.add_argument("--max-shard-size", default=DEFAULT_SHARD_SIZE, help="default 1GB")
    p.add_argument("--force", action="store_true", help="regenerate even if the cache marker matches")
    a = p.parse_args(argv)
    layers = a.layers if a.layers is not None else layers_for_scale(a.scale if a.scale is not None else 1.0)
    generate(a.out, layers, seed=a.seed, finetune_seed=a.finetune_seed, max_shard_size=a.max_shard_size, force=a.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
