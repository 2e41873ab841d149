"""LoRA-native merges and extract-lora on real PEFT adapters (expectations from PEFT's own merges)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hf_taskarith.cli import main
from hf_taskarith.errors import TaskArithError
from hf_taskarith.method_merge import run_recipe
from hf_taskarith.recipe import load_recipe
from test_task_vectors import load_all, peft_merged_state

ADAPTERS = ["lora_plain", "lora_b", "lora_rslora"]  # ranks 4/8/4, different targets, rsLoRA, alphas
WEIGHTS = [0.5, -0.3, 0.8]


def dense_deltas(zoo):
    """ΔW_i per tensor from PEFT's merge_and_unload (a second implementation)."""
    base = load_all(zoo["llama_base"])
    out = []
    for name in ADAPTERS:
        merged = peft_merged_state(zoo["llama_base"], zoo[name])
        out.append({k: merged[k] - base[k] for k in base})
    return base, out


def merge_recipe(zoo, tmp_path, **output):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "base": str(zoo["llama_base"]), "method": "task_arithmetic", "parameters": {"lambda": 1.0},
        "tasks": [{"adapter": str(zoo[n]), "weight": w} for n, w in zip(ADAPTERS, WEIGHTS)],
        "output": {"format": "adapter", **output},
    }))
    return run_recipe(load_recipe(path), tmp_path / "out", overwrite=True)


def merged_dense(zoo, folder):
    base = load_all(zoo["llama_base"])
    merged = peft_merged_state(zoo["llama_base"], folder)
    return {k: merged[k] - base[k] for k in base}


def test_exact_mode_is_the_weighted_sum(zoo, tmp_path):
    folder = merge_recipe(zoo, tmp_path, mode="exact")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and not cfg["use_dora"]
    base, deltas = dense_deltas(zoo)
    got = merged_dense(zoo, folder)
    changed = 0
    for k in base:
        want = sum(w * d[k] for w, d in zip(WEIGHTS, deltas))
        if torch.any(want):
            changed += 1
            assert float((got[k] - want).norm() / want.norm()) < 1e-6, k
        else:
            assert not torch.any(got[k]), k
    assert changed > 0
    # rank Σ r_i where modules overlap: q_proj is in all three adapters (4 + 8 + 4)
    ranks = {**{m: cfg["r"] for m in cfg["target_modules"]}, **cfg["rank_pattern"]}
    assert ranks["model.layers.0.self_attn.q_proj"] == 16
    assert ranks["model.layers.0.mlp.up_proj"] == 8  # only in lora_b: union of targets


@pytest.mark.parametrize("rank", [2, 5])
def test_svd_mode_has_the_eckart_young_error(zoo, tmp_path, rank):
    folder = merge_recipe(zoo, tmp_path, mode="svd", rank=rank)
    base, deltas = dense_deltas(zoo)
    got = merged_dense(zoo, folder)
    for k in base:
        want = sum(w * d[k] for w, d in zip(WEIGHTS, deltas))
        if not torch.any(want):
            continue
        s = torch.linalg.svdvals(want.double())
        best = float(s[rank:].pow(2).sum().sqrt())  # error of the dense truncated SVD
        err = float((got[k].double() - want.double()).norm())
        assert err == pytest.approx(best, rel=1e-5, abs=1e-6), k


def test_svd_energy_writes_a_rank_pattern(zoo, tmp_path):
    folder = merge_recipe(zoo, tmp_path, mode="svd", energy=0.9)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    base, deltas = dense_deltas(zoo)
    ranks = {**{m: cfg["r"] for m in cfg["target_modules"]}, **cfg["rank_pattern"]}
    for module, r in ranks.items():
        want = sum(w * d[module + ".weight"] for w, d in zip(WEIGHTS, deltas))
        p = torch.linalg.svdvals(want.double()).pow(2)
        frac = torch.cumsum(p, 0) / p.sum()
        assert r == int((frac < 0.9 - 1e-12).sum()) + 1, module
    assert len(set(ranks.values())) > 1


def test_merged_adapter_forward_equals_base_plus_dense_delta(zoo, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = merge_recipe(zoo, tmp_path, mode="exact")
    base, deltas = dense_deltas(zoo)
    dense = AutoModelForCausalLM.from_pretrained(zoo["llama_base"])
    dense.load_state_dict({k: base[k] + sum(w * d[k] for w, d in zip(WEIGHTS, deltas)) for k in base})
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo["llama_base"]), folder).eval()
    ids = torch.tensor([[1, 5, 7, 9, 4, 2]])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, dense.eval()(ids).logits, rtol=1e-4, atol=1e-5)


def test_knots_task_arithmetic_without_truncation_is_exact(zoo, tmp_path):
    folder = merge_recipe(zoo, tmp_path, mode="knots")
    base, deltas = dense_deltas(zoo)
    got = merged_dense(zoo, folder)
    for k in base:
        want = sum(w * d[k] for w, d in zip(WEIGHTS, deltas))
        if torch.any(want):
            assert float((got[k] - want).norm() / want.norm()) < 1e-5, k


def test_knots_ties_runs_and_loads(zoo, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "base": str(zoo["llama_base"]), "method": "ties", "parameters": {"density": 0.5},
        "tasks": [{"adapter": str(zoo["lora_plain"])}, {"adapter": str(zoo["lora_b"])}],
        "output": {"format": "adapter", "mode": "knots"},
    }))
    assert main(["-q", "merge", str(path), "--out", str(tmp_path / "o")]) == 0
    merged_dense(zoo, tmp_path / "o")
    card = (tmp_path / "o" / "README.md").read_text()
    assert "base_model_relation: adapter" in card and "library_name: peft" in card


def test_modules_to_save_are_merged(zoo, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "base": str(zoo["llama_base"]), "method": "task_arithmetic",
        "tasks": [{"adapter": str(zoo["lora_mts"]), "weight": 0.5}, {"adapter": str(zoo["lora_plain"]), "weight": 0.5}],
        "output": {"format": "adapter"},
    }))
    folder = run_recipe(load_recipe(path), tmp_path / "o")
    base = load_all(zoo["llama_base"])
    mts = peft_merged_state(zoo["llama_base"], zoo["lora_mts"])
    got = peft_merged_state(zoo["llama_base"], folder)
    torch.testing.assert_close(got["lm_head.weight"], base["lm_head.weight"] + 0.5 * (mts["lm_head.weight"] - base["lm_head.weight"]))


@pytest.mark.parametrize(
    "tasks,output,needle",
    [
        (["lora_dora"], {"mode": "svd"}, "DoRA"),
        (["lora_plain", "llama_ft_a"], {}, "extract-lora"),
    ],
)
def test_adapter_merge_errors(zoo, tmp_path, capsys, tasks, output, needle):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "base": str(zoo["llama_base"]), "method": "task_arithmetic",
        "tasks": [{("model" if "ft" in t else "adapter"): str(zoo[t])} for t in tasks],
        "output": {"format": "adapter", **output},
    }))
    out = tmp_path / "o"
    assert main(["-q", "merge", str(path), "--out", str(out)]) != 0
    assert needle in capsys.readouterr().err and not out.exists()


def test_adapters_for_another_base_are_refused(zoo, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "base": str(zoo["llama_other_arch"]), "method": "task_arithmetic",
        "tasks": [{"adapter": str(zoo["lora_plain"])}], "output": {"format": "adapter"},
    }))
    assert main(["-q", "merge", str(path), "--out", str(tmp_path / "o")]) != 0
    assert "another base" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_extract_lora_full_rank_reproduces_tau(zoo, tmp_path, arch):
    out = tmp_path / "ad"
    assert main(["-q", "extract-lora", "--base", str(zoo[f"{arch}_base"]), "--model", str(zoo[f"{arch}_ft_a"]),
                 "--energy", "1.0", "--embeddings", "--out", str(out)]) == 0
    merged = peft_merged_state(zoo[f"{arch}_base"], out)  # loads in PEFT, merges with PEFT
    for k, v in load_all(zoo[f"{arch}_ft_a"]).items():
        torch.testing.assert_close(merged[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_extract_lora_rank_truncates(zoo, tmp_path):
    out = tmp_path / "ad"
    assert main(["-q", "extract-lora", "--base", str(zoo["llama_base"]), "--model", str(zoo["llama_ft_a"]),
                 "--rank", "2", "--out", str(out)]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 2
    base, ft = load_all(zoo["llama_base"]), load_all(zoo["llama_ft_a"])
    got = peft_merged_state(zoo["llama_base"], out)
    k = "model.layers.0.mlp.down_proj.weight"
    tau = ft[k] - base[k]
    best = float(torch.linalg.svdvals(tau)[2:].pow(2).sum().sqrt())
    assert float((got[k] - ft[k]).norm()) == pytest.approx(best, rel=1e-4)
