"""Merge methods on real checkpoints through recipes and the streaming engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from hf_taskarith.cli import main
from hf_taskarith.method_merge import build_merge, run_recipe
from hf_taskarith.recipe import load_recipe
from test_task_vectors import load_all, peft_merged_state


def recipe(tmp_path: Path, **data) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_ta_one_task_lambda_one_is_the_finetune(zoo, tmp_path):
    r = recipe(tmp_path, base=str(zoo["llama_base"]), method="task_arithmetic", tasks=[{"model": str(zoo["llama_ft_a"])}], dtype="float32")
    out = run_recipe(load_recipe(r), tmp_path / "out", progress=False)
    want = load_all(zoo["llama_ft_a"])
    for k, v in load_all(out).items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=1e-7)


def test_ties_mixing_finetune_and_adapter_matches_peft(zoo, tmp_path):
    """Second implementation: PEFT's merge_utils.ties on the same task vectors."""
    from peft.utils.merge_utils import ties

    r = recipe(
        tmp_path, base=str(zoo["llama_base"]), method="ties", parameters={"density": 0.5, "lambda": 0.9},
        tasks=[{"model": str(zoo["llama_ft_a"]), "weight": 0.7}, {"adapter": str(zoo["lora_b"]), "weight": 0.4}],
        dtype="float32",
    )
    got = load_all(run_recipe(load_recipe(r), tmp_path / "out", progress=False))
    base, ft = load_all(zoo["llama_base"]), load_all(zoo["llama_ft_a"])
    ad = peft_merged_state(zoo["llama_base"], zoo["lora_b"])
    for k in base:
        deltas = [ft[k] - base[k], ad[k] - base[k]]
        expected = base[k] + 0.9 * ties(deltas, torch.tensor([0.7, 0.4]), 0.5)
        torch.testing.assert_close(got[k], expected, rtol=1e-5, atol=1e-6, msg=k)


def test_stochastic_methods_are_deterministic_by_seed(zoo, tmp_path):
    def run(seed, name):
        r = recipe(tmp_path, base=str(zoo["llama_base"]), method="dare_ties", seed=seed,
                   parameters={"density": 0.5}, tasks=[{"model": str(zoo["llama_ft_a"])}, {"model": str(zoo["llama_ft_b"])}])
        return (run_recipe(load_recipe(r), tmp_path / name, progress=False) / "model.safetensors").read_bytes()

    assert run(7, "a") == run(7, "b")
    assert run(7, "c") != run(8, "d")


def test_global_topk_selects_over_the_whole_model(zoo, tmp_path):
    r = recipe(tmp_path, base=str(zoo["llama_base"]), method="magnitude_prune", topk_scope="global",
               parameters={"density": 0.1}, tasks=[{"model": str(zoo["llama_ft_a"]), "weight": 0.5}, {"model": str(zoo["llama_ft_b"]), "weight": 0.5}],
               dtype="float32")
    got = load_all(run_recipe(load_recipe(r), tmp_path / "out", progress=False))
    base = load_all(zoo["llama_base"])
    expected = {k: v.clone() for k, v in base.items()}
    for name in ("llama_ft_a", "llama_ft_b"):
        ft = load_all(zoo[name])
        deltas = {k: ft[k] - base[k] for k in base}
        flat = torch.cat([d.reshape(-1).abs() for d in deltas.values()])
        thr = flat.topk(int(0.1 * flat.numel())).values[-1]
        for k, d in deltas.items():
            expected[k] += 0.5 * d * (d.abs() >= thr)
    kept_per_tensor = []
    for k in base:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-7, msg=k)
        kept_per_tensor.append(float((got[k] != base[k]).float().mean()))
    assert max(kept_per_tensor) - min(kept_per_tensor) > 0.05  # global: densities differ per tensor


def _layer_key(name):
    import re

    m = re.search(r"\.layers\.(\d+)\.", name)
    return m.group(0) if m else name


def _hierarchical_expected(base, a, b):
    """w_l = max(0, cos) over each layer's concatenated deltas; θ = θ0 + (1−w)Δ_A + wΔ_B."""
    groups = {}
    for k in base:
        groups.setdefault(_layer_key(k), []).append(k)
    out = {}
    for keys in groups.values():
        da = torch.cat([(a[k] - base[k]).reshape(-1) for k in keys])
        db = torch.cat([(b[k] - base[k]).reshape(-1) for k in keys])
        w = max(0.0, float(torch.nn.functional.cosine_similarity(da, db, dim=0)))
        for k in keys:
            out[k] = base[k] + (1 - w) * (a[k] - base[k]) + w * (b[k] - base[k])
    return out


def test_hierarchical_layer_cosine_interpolation(zoo, tmp_path):
    r = recipe(tmp_path, base=str(zoo["llama_base"]), method="hierarchical",
               tasks=[{"model": str(zoo["llama_ft_a"])}, {"model": str(zoo["llama_ft_b"])}], dtype="float32")
    got = load_all(run_recipe(load_recipe(r), tmp_path / "out", progress=False))
    expected = _hierarchical_expected(load_all(zoo["llama_base"]), load_all(zoo["llama_ft_a"]), load_all(zoo["llama_ft_b"]))
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_hierarchical_head_alignment_undoes_a_permutation(zoo, tmp_path):
    """Model B with its attention heads permuted (same function) merges like the unpermuted B."""
    b = load_all(zoo["llama_ft_b"])
    cfg = json.loads((zoo["llama_ft_b"] / "config.json").read_text())
    h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    perm, kv_perm = torch.tensor([2, 3, 0, 1]), torch.tensor([1, 0])  # swap the two KV groups
    for key in list(b):
        if ".self_attn." not in key:
            continue
        w = b[key]
        if "q_proj" in key:
            b[key] = w.reshape(h, -1, w.shape[1])[perm].reshape(w.shape)
        elif "k_proj" in key or "v_proj" in key:
            b[key] = w.reshape(kv, -1, w.shape[1])[kv_perm].reshape(w.shape)
        elif "o_proj" in key:
            b[key] = w.reshape(w.shape[0], h, -1)[:, perm].reshape(w.shape)
    permuted = tmp_path / "ft_b_permuted"
    permuted.mkdir()
    save_file(b, permuted / "model.safetensors", metadata={"format": "pt"})
    (permuted / "config.json").write_text(json.dumps(cfg))
    r = recipe(tmp_path, base=str(zoo["llama_base"]), method="hierarchical", parameters={"align_heads": True},
               tasks=[{"model": str(zoo["llama_ft_a"])}, {"model": str(permuted)}], dtype="float32")
    got = load_all(run_recipe(load_recipe(r), tmp_path / "out", progress=False))
    expected = _hierarchical_expected(load_all(zoo["llama_base"]), load_all(zoo["llama_ft_a"]), load_all(zoo["llama_ft_b"]))
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_per_tensor_and_per_task_parameters(zoo, tmp_path):
    r = recipe(
        tmp_path, base=str(zoo["llama_base"]), method="ties",
        parameters={"density": [{"filter": "self_attn", "value": 0.5}, {"value": [0.1, 0.3]}]},
        tasks=[{"model": str(zoo["llama_ft_a"])}, {"model": str(zoo["llama_ft_b"]), "parameters": {"density": 0.9}}],
    )
    merge = build_merge(load_recipe(r))
    assert merge.params_for("model.layers.0.self_attn.q_proj.weight")["density"] == [0.5, 0.9]
    assert merge.params_for("model.layers.1.mlp.up_proj.weight")["density"] == [pytest.approx(0.3), 0.9]
    assert merge.params_for("model.layers.0.mlp.up_proj.weight")["density"] == [pytest.approx(0.1), 0.9]


def test_cli_merge_and_validate_resolve(zoo, tmp_path, capsys):
    good = recipe(tmp_path, base=str(zoo["llama_base"]), method="ties",
                  tasks=[{"model": str(zoo["llama_ft_a"])}, {"adapter": str(zoo["lora_plain"])}])
    assert main(["-q", "validate", str(good), "--resolve"]) == 0
    assert "fits" in capsys.readouterr().out
    assert main(["-q", "merge", str(good), "--out", str(tmp_path / "o")]) == 0
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    bad = recipe(tmp_path, base=str(zoo["llama_other_arch"]), method="ties", tasks=[{"adapter": str(zoo["lora_plain"])}])
    assert main(["-q", "validate", str(bad)]) == 0  # schema alone is fine
    assert main(["-q", "validate", str(bad), "--resolve"]) != 0
    assert "another base" in capsys.readouterr().err
