"""LoRA-native svd merge vs PEFT ``add_weighted_adapter(combination_type="svd")`` (issue 4).

    python tests/bench/adapter_bench.py make   DIR --layers N      # base headers + 4 adapters
    python tests/bench/adapter_bench.py peft   DIR OUT [--no-full-matrices]
    python tests/bench/adapter_bench.py ours   DIR OUT
    python tests/bench/adapter_bench.py errors DIR PEFT_OUT OURS_OUT [--layer 0]

Inputs (``make``): a base checkpoint with Llama-7B module shapes (hidden 4096, intermediate 11008,
32 heads, ``N`` layers, vocab 256) and 4 PEFT LoRA adapters (r = 16; lora_alpha 16, 32, 32, 64;
targets q, k, v, o, gate, up, down of every layer). The base's safetensors file is written
sparse (a valid header, zero data, no disk blocks): neither merge reads base weights, PEFT's model
is built on the meta device and moved to uninitialised memory (``to_empty``), and ours reads only
headers. Adapter values: ``A ~ N(0, 1/in)``, ``B ~ 0.01·N(0, 1)``, seeded per (adapter, module),
so layer ``l`` is the same whatever ``N`` is.

``peft`` and ``ours`` print one JSON line with ``merge_s``: the time of the merge call itself
(PEFT: ``add_weighted_adapter`` on the adapters already loaded in a ``PeftModel``; ours:
``AdapterMerge.save_pretrained``, which also reads the four adapter files and writes the merged
adapter, so it is the more expensive scope) and ``rss_before_gb``: the process RSS just before
it. ``OUT`` receives the merged factors (``adapter_model.safetensors``). ``errors`` computes,
for every module of one layer, the dense ``ΔW = Σ w_i s_i B_i A_i`` in float64, its singular values
(``torch.linalg.svdvals`` of ``ΔW·Q``, Q an orthonormal basis of the stacked A's row space; the
dense best rank-r error is the norm of the tail), and
``‖ΔW − B A‖_F`` of both merged adapters.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import Dict, List, Tuple

import torch

HIDDEN, INTER, HEADS, VOCAB = 4096, 11008, 32, 256
RANK = 16
ALPHAS = (16, 32, 32, 64)
WEIGHTS = (0.4, 0.3, 0.2, 0.1)
MODULES = {  # name → (out, in)
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTER, HIDDEN),
    "mlp.up_proj": (INTER, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTER),
}
PREFIX = "base_model.model."


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def _maxrss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def llama_config(layers: int):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=HEADS, num_key_value_heads=HEADS,
        num_hidden_layers=layers, vocab_size=VOCAB, tie_word_embeddings=False, dtype="bfloat16",
    )
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def base_shapes(layers: int) -> Dict[str, Tuple[int, ...]]:
    shapes: Dict[str, Tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for n in range(layers):
        for mod, (o, i) in MODULES.items():
            shapes[f"model.layers.{n}.{mod}.weight"] = (o, i)
        shapes[f"model.layers.{n}.input_layernorm.weight"] = (HIDDEN,)
        shapes[f"model.layers.{n}.post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def write_sparse_safetensors(path: Path, shapes: Dict[str, Tuple[int, ...]]) -> None:
    """A valid bf16 safetensors file of zeros whose data region is a hole (no disk blocks)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        f.truncate(8 + len(blob) + offset)


def _gen(adapter: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed(adapter * 1_000_003 + zlib.crc32(key.encode()))


def make(root: Path, layers: int) -> None:
    marker = {"version": 1, "layers": layers, "rank": RANK, "alphas": ALPHAS}
    mk = root / ".adapter_bench.json"
    if mk.exists() and json.loads(mk.read_text()) == marker:
        print(f"[adapter_bench] reuse {root}", file=sys.stderr)
        return
    from safetensors.torch import save_file

    base = root / "base"
    base.mkdir(parents=True, exist_ok=True)
    write_sparse_safetensors(base / "model.safetensors", base_shapes(layers))
    llama_config(layers).save_pretrained(base)
    for k, alpha in enumerate(ALPHAS, 1):
        ad = root / f"ad{k}"
        ad.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for n in range(layers):
            for mod, (o, i) in MODULES.items():
                key = f"model.layers.{n}.{mod}"
                tensors[f"{PREFIX}{key}.lora_A.weight"] = torch.randn(RANK, i, generator=_gen(k, key + ".A")) / math.sqrt(i)
                tensors[f"{PREFIX}{key}.lora_B.weight"] = 0.01 * torch.randn(o, RANK, generator=_gen(k, key + ".B"))
        save_file(tensors, str(ad / "adapter_model.safetensors"), metadata={"format": "pt"})
        (ad / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
            "r": RANK, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
            "target_modules": sorted(m.split(".")[-1] for m in MODULES), "use_rslora": False, "use_dora": False,
            "inference_mode": True,
        }, indent=2))
    mk.write_text(json.dumps(marker))


def run_peft(root: Path, out: Path, full_matrices: bool) -> dict:
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    layers = json.loads((root / ".adapter_bench.json").read_text())["layers"]
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(layers))
    model = model.to_empty(device="cpu")  # uninitialised: pages never touched stay out of RSS
    model = PeftModel.from_pretrained(model, str(root / "ad1"), adapter_name="ad1")
    for k in range(2, len(ALPHAS) + 1):
        model.load_adapter(str(root / f"ad{k}"), adapter_name=f"ad{k}")
    names = [f"ad{k}" for k in range(1, len(ALPHAS) + 1)]
    rss0 = _rss_gb()
    t0 = time.perf_counter()
    model.add_weighted_adapter(names, list(WEIGHTS), "merged", combination_type="svd", svd_rank=RANK,
                               svd_full_matrices=full_matrices)
    merge_s = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "merged" in getattr(mod, "lora_A", {}):
            key = name[len(PREFIX):] if name.startswith(PREFIX) else name
            tensors[f"{PREFIX}{key}.lora_A.weight"] = mod.lora_A["merged"].weight.detach().contiguous()
            tensors[f"{PREFIX}{key}.lora_B.weight"] = (mod.lora_B["merged"].weight * mod.scaling["merged"]).detach().contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return {"merge_s": merge_s, "rss_before_gb": rss0, "maxrss_gb": _maxrss_gb(), "modules": len(tensors) // 2,
            "per_layer_s": merge_s / layers, "layers": layers}


def run_ours(root: Path, out: Path) -> dict:
    from hf_taskarith.adapter_merge import AdapterInput, AdapterMerge
    from hf_taskarith.task_vector import BaseModel, TaskVector

    layers = json.loads((root / ".adapter_bench.json").read_text())["layers"]
    base = BaseModel(str(root / "base"))
    inputs = [AdapterInput(TaskVector.from_adapter(str(root / f"ad{k}")), w) for k, w in enumerate(WEIGHTS, 1)]
    rss0 = _rss_gb()
    t0 = time.perf_counter()
    AdapterMerge(base, inputs, mode="svd", rank=RANK).save_pretrained(out, overwrite=True)
    merge_s = time.perf_counter() - t0
    return {"merge_s": merge_s, "rss_before_gb": rss0, "maxrss_gb": _maxrss_gb(), "per_layer_s": merge_s / layers,
            "layers": layers}


def _factors(folder: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    cfg_path = folder / "adapter_config.json"
    scale = 1.0
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        scale = cfg["lora_alpha"] / cfg["r"]  # both tools write alpha = r (scaling 1); checked, not assumed
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            raise SystemExit(f"{folder}: rank/alpha patterns not expected here")
    t = load_file(str(folder / "adapter_model.safetensors"))
    return {k: (v * scale if ".lora_B." in k else v) for k, v in t.items()}


def errors(root: Path, peft_out: Path, ours_out: Path, layer: int) -> dict:
    """Frobenius errors of both merged adapters vs the dense ΔW and its best rank-r approximation."""
    from safetensors.torch import load_file

    ads = [load_file(str(root / f"ad{k}" / "adapter_model.safetensors")) for k in range(1, len(ALPHAS) + 1)]
    fp, fo = _factors(peft_out), _factors(ours_out)
    rows, tot = [], {"best": 0.0, "peft": 0.0, "ours": 0.0, "norm": 0.0}
    for mod in MODULES:
        key = f"{PREFIX}model.layers.{layer}.{mod}"
        dense = torch.zeros(MODULES[mod], dtype=torch.float64)
        for ad, alpha, w in zip(ads, ALPHAS, WEIGHTS):
            dense += (w * alpha / RANK) * (ad[key + ".lora_B.weight"].double() @ ad[key + ".lora_A.weight"].double())
        # The rows of ΔW lie in the row space of the stacked A's, so with Q an orthonormal basis of it
        # ΔW = (ΔW Q) Qᵀ and ΔW has the singular values of the out×Σr matrix ΔW Q: exact, and a few
        # seconds instead of a dense SVD per module. Checked: Σ s² = ‖ΔW‖_F².
        a_cat = torch.cat([ad[key + ".lora_A.weight"].double() for ad in ads], dim=0)
        q = torch.linalg.qr(a_cat.T, mode="reduced").Q
        s = torch.linalg.svdvals(dense @ q)
        norm = float(dense.norm())
        if abs(float(s.square().sum().sqrt()) - norm) > 1e-9 * norm:
            raise SystemExit(f"{key}: singular values do not account for ‖ΔW‖_F")
        best = float(s[RANK:].square().sum().sqrt())
        e = {}
        for label, f in (("peft", fp), ("ours", fo)):
            approx = f[key + ".lora_B.weight"].double() @ f[key + ".lora_A.weight"].double()
            e[label] = float((dense - approx).norm())
        rows.append({"module": mod, "norm": norm, "best": best, **e})
        for k in ("best", "peft", "ours", "norm"):
            tot[k] += (best if k == "best" else norm if k == "norm" else e[k]) ** 2
    return {"layer": layer, "modules": rows, "total": {k: math.sqrt(v) for k, v in tot.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("dir")
    m.add_argument("--layers", type=int, default=1)
    pp = sub.add_parser("peft")
    pp.add_argument("dir")
    pp.add_argument("out")
    pp.add_argument("--no-full-matrices", action="store_true", help="svd_full_matrices=False (PEFT default: True)")
    po = sub.add_parser("ours")
    po.add_argument("dir")
    po.add_argument("out")
    pe = sub.add_parser("errors")
    pe.add_argument("dir")
    pe.add_argument("peft_out")
    pe.add_argument("ours_out")
    pe.add_argument("--layer", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    if a.cmd == "make":
        make(Path(a.dir), a.layers)
        return 0
    if a.cmd == "peft":
        res = run_peft(Path(a.dir), Path(a.out), not a.no_full_matrices)
    elif a.cmd == "ours":
        res = run_ours(Path(a.dir), Path(a.out))
    else:
        res = errors(Path(a.dir), Path(a.peft_out), Path(a.ours_out), a.layer)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
