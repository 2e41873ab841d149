"""Task vectors from finetunes and adapters, checked against transformers and PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_taskarith import BaseModel, TaskVector


def load_all(folder: Path) -> dict:
    """All tensors of a folder with safetensors' own loader (independent of our reader)."""
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def peft_merged_state(base_dir: Path, adapter_dir: Path) -> dict:
    """The reference: PEFT's own merge_and_unload()."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2"])
def test_base_plus_tau_reproduces_finetune_fp32_exactly(zoo, tmp_path, arch):
    base, ft = zoo[f"{arch}_base"], zoo[f"{arch}_ft_a"]
    out = TaskVector.from_models(base, ft).apply_to(base).save_pretrained(tmp_path / "out", dtype="float32", progress=False)
    got, want = load_all(out), load_all(ft)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_base_plus_tau_in_bf16_is_the_finetune_rounded(zoo, tmp_path, arch):
    base, ft = zoo[f"{arch}_base"], zoo[f"{arch}_ft_a"]
    out = TaskVector.from_models(base, ft).apply_to(base).save_pretrained(tmp_path / "out", dtype="bfloat16", progress=False)
    got, want = load_all(out), load_all(ft)
    for name in want:
        assert got[name].dtype == torch.bfloat16
        torch.testing.assert_close(got[name].float(), want[name], rtol=2**-8, atol=1e-6)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"


@pytest.mark.parametrize(
    "adapter,base",
    [
        ("lora_plain", "llama_base"),
        ("lora_rslora", "llama_base"),
        ("lora_dora", "llama_base"),
        ("lora_patterns", "llama_base"),
        ("lora_embedding", "llama_base"),
        ("lora_mts", "llama_base"),
        ("lora_b", "llama_base"),
        ("gpt2_lora", "gpt2_base"),
        ("gpt2_dora", "gpt2_base"),
    ],
)
def test_adapter_task_vector_equals_peft_merge_and_unload(zoo, adapter, base):
    if adapter not in zoo:
        pytest.skip(f"{adapter} not built by this PEFT version")
    want = peft_merged_state(zoo[base], zoo[adapter])
    got = TaskVector.from_adapter(zoo[adapter]).apply_to(zoo[base]).state_dict(torch.float32)
    base_sd = load_all(zoo[base])
    changed = 0
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, want[name], rtol=1e-5, atol=1e-5, msg=name)
        changed += not torch.equal(tensor, base_sd[name])
    assert changed > 0  # the adapter really changed something


def test_rslora_and_patterns_scale_as_documented(zoo):
    """τ for one module equals alpha/sqrt(r)·B@A (rsLoRA) and the pattern-overridden alpha/r."""
    ad = load_all(zoo["lora_rslora"])
    cfg = json.loads((zoo["lora_rslora"] / "adapter_config.json").read_text())
    key = next(k for k in ad if k.endswith("q_proj.lora_A.weight"))
    a, b = ad[key], ad[key.replace("lora_A", "lora_B")]
    name = key.replace("base_model.model.", "").replace(".lora_A.weight", ".weight")
    expected = cfg["lora_alpha"] / cfg["r"] ** 0.5 * (b @ a)
    got = TaskVector.from_adapter(zoo["lora_rslora"]).delta(name, zoo["llama_base"])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_identities(zoo):
    base = BaseModel(zoo["llama_base"])
    tv = TaskVector.from_models(base, zoo["llama_ft_a"])
    ad = TaskVector.from_adapter(zoo["lora_plain"])
    name = "model.layers.0.self_attn.q_proj.weight"
    base_t = load_all(zoo["llama_base"])[name]
    ft_t = load_all(zoo["llama_ft_a"])[name]
    tau = ft_t - base_t
    assert torch.count_nonzero((tv - tv).delta(name, base)) == 0
    torch.testing.assert_close((tv + tv).delta(name, base), 2 * tau)
    torch.testing.assert_close((-(-tv)).delta(name, base), tau)
    torch.testing.assert_close(sum([tv, tv, ad]).delta(name, base), 2 * tau + ad.delta(name, base))
    torch.testing.assert_close((tv / 2).delta(name, base), 0.5 * tau)
    # (τ − τ) applied to the base is the base, bit for bit
    for k, v in (tv - tv + 0 * ad).apply_to(base).state_dict(torch.float32).items():
        assert torch.equal(v, load_all(zoo["llama_base"])[k])


def test_negation_and_scaled_sum_match_the_formula(zoo):
    base = BaseModel(zoo["llama_base"])
    b_sd, a_sd, c_sd = (load_all(zoo[n]) for n in ("llama_base", "llama_ft_a", "llama_ft_b"))
    tv_a, tv_b = TaskVector.from_models(base, zoo["llama_ft_a"]), TaskVector.from_models(base, zoo["llama_ft_b"])
    neg = (base - tv_a).state_dict(torch.float32)
    mix = (0.4 * (tv_a + tv_b)).apply_to(base, scaling_coef=0.5).state_dict(torch.float32)
    for k in b_sd:
        torch.testing.assert_close(neg[k], b_sd[k] - (a_sd[k] - b_sd[k]), rtol=1e-6, atol=1e-7)
        expected = b_sd[k] + 0.2 * ((a_sd[k] - b_sd[k]) + (c_sd[k] - b_sd[k]))
        torch.testing.assert_close(mix[k], expected, rtol=1e-6, atol=1e-7)


def test_the_readme_expression_reads_like_the_paper(zoo):
    """``base + 0.4 * (tv_a + tv_b) - 0.5 * tv_c``, left to right, is θ0 + 0.4(τa + τb) − 0.5τc."""
    base = BaseModel(zoo["llama_base"])
    b_sd, a_sd, b2_sd, c_sd = (load_all(zoo[n]) for n in ("llama_base", "llama_ft_a", "llama_ft_b", "llama_ft_c"))
    tv_a, tv_b, tv_c = (TaskVector.from_models(base, zoo[n]) for n in ("llama_ft_a", "llama_ft_b", "llama_ft_c"))
    got = (base + 0.4 * (tv_a + tv_b) - 0.5 * tv_c).state_dict(torch.float32)
    for k in b_sd:
        want = b_sd[k] + 0.4 * ((a_sd[k] - b_sd[k]) + (b2_sd[k] - b_sd[k])) - 0.5 * (c_sd[k] - b_sd[k])
        torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-7)


def test_mixing_a_finetune_and_an_adapter(zoo):
    base = BaseModel(zoo["llama_base"])
    want_ad = peft_merged_state(zoo["llama_base"], zoo["lora_plain"])
    b_sd, a_sd = load_all(zoo["llama_base"]), load_all(zoo["llama_ft_a"])
    got = (0.5 * TaskVector.from_models(base, zoo["llama_ft_a"]) - 0.7 * TaskVector.from_adapter(zoo["lora_plain"]))
    got = got.apply_to(base).state_dict(torch.float32)
    for k in b_sd:
        expected = b_sd[k] + 0.5 * (a_sd[k] - b_sd[k]) - 0.7 * (want_ad[k] - b_sd[k])
        torch.testing.assert_close(got[k], expected, rtol=1e-5, atol=1e-6)


def test_exclude_keeps_tensors_at_the_base(zoo):
    base = BaseModel(zoo["llama_base"])
    tv = TaskVector.from_models(base, zoo["llama_ft_a"], exclude=[r"^lm_head\.", r"embed_tokens"])
    got = tv.apply_to(base).state_dict(torch.float32)
    b_sd, a_sd = load_all(zoo["llama_base"]), load_all(zoo["llama_ft_a"])
    assert torch.equal(got["lm_head.weight"], b_sd["lm_head.weight"])
    assert torch.equal(got["model.embed_tokens.weight"], b_sd["model.embed_tokens.weight"])
    assert torch.equal(got["model.norm.weight"], a_sd["model.norm.weight"])


def test_task_vectors_from_live_models(zoo):
    """The in-memory path used at the end of an Accelerate training script."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ft_model = AutoModelForCausalLM.from_pretrained(zoo["llama_ft_a"], dtype=torch.float32)
    got = TaskVector.from_model(ft_model, base=zoo["llama_base"]).apply_to(zoo["llama_base"]).state_dict(torch.float32)
    for k, v in load_all(zoo["llama_ft_a"]).items():
        assert torch.equal(got[k], v), k

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo["llama_base"]), zoo["lora_dora"])
    got = TaskVector.from_model(peft_model, base=zoo["llama_base"]).apply_to(zoo["llama_base"]).state_dict(torch.float32)
    want = peft_merged_state(zoo["llama_base"], zoo["lora_dora"])
    for k, v in got.items():
        torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-5)


def test_building_expressions_reads_no_tensor(zoo, monkeypatch):
    from hf_taskarith.checkpoint import SafetensorsCheckpoint

    reads = []
    original = SafetensorsCheckpoint.get
    monkeypatch.setattr(SafetensorsCheckpoint, "get", lambda self, name: reads.append(name) or original(self, name))
    base = BaseModel(zoo["llama_base"])
    expr = 0.4 * (TaskVector.from_models(base, zoo["llama_ft_a"]) + TaskVector.from_adapter(zoo["lora_plain"]))
    merged = (expr - 0.5 * TaskVector.from_models(base, zoo["llama_ft_b"])).apply_to(base)
    merged.validate()
    assert reads == []
    next(iter(merged.iter_tensors()))
    assert reads  # evaluation does read


def test_to_model_generates_and_matches_saved(zoo, tmp_path):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    merged = (0.5 * TaskVector.from_models(zoo["llama_base"], zoo["llama_ft_a"])).apply_to(zoo["llama_base"])
    out = merged.save_pretrained(tmp_path / "m", dtype="float32", max_shard_size=20_000, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in load_all(out).values())
    loaded = AutoModelForCausalLM.from_pretrained(out)
    in_mem = merged.to_model(torch.float32)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, in_mem.state_dict()[k]), k
    tok = PreTrainedTokenizerFast.from_pretrained(out)
    ids = tok("1 2 3", return_tensors="pt").input_ids
    gen = loaded.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == ids.shape[1] + 5
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
