"""Sanity checks of the tiny model zoo: if these fail, every other test's fixtures are suspect."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import zoo as zoo_mod
from zoo import populate_hf_cache

FINETUNES = {
    "llama_ft_a": "llama_base", "llama_ft_b": "llama_base", "llama_ft_c": "llama_base",
    "mistral_ft_a": "mistral_base", "gpt2_ft_a": "gpt2_base", "llama_resized": "llama_base",
}
ADAPTERS = list(zoo_mod.LLAMA_ADAPTERS) + list(zoo_mod.GPT2_ADAPTERS)


def weights(folder: Path) -> dict:
    return load_file(Path(folder) / "model.safetensors")


def adapter_weights(folder: Path) -> dict:
    return load_file(Path(folder) / "adapter_model.safetensors")


def adapter_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "adapter_config.json").read_text())


def need(zoo, name):
    if name not in zoo:
        pytest.skip(f"{name} not built: {json.loads((zoo['tokenizer'].parent / 'zoo.json').read_text())['skipped']}")
    return zoo[name]


# ---------------------------------------------------------------- the index
def test_names_and_cached_rebuild(zoo):
    root = zoo["tokenizer"].parent
    index = json.loads((root / "zoo.json").read_text())
    assert index["version"] == zoo_mod.ZOO_VERSION
    assert set(zoo) | set(index["skipped"]) == set(zoo_mod.NAMES)
    assert set(index["skipped"]) <= {"gpt2_dora"}
    assert all(p.is_dir() and p.parent == root for p in zoo.values())
    t = time.perf_counter()
    assert zoo_mod.build_zoo(root) == zoo  # cached: no rebuild
    assert time.perf_counter() - t < 0.5


# ---------------------------------------------------------------- tokenizer and bases
def test_tokenizer(zoo):
    from transformers import AutoTokenizer

    tok = zoo_mod.load_tokenizer(zoo["tokenizer"])
    assert 128 <= len(tok) <= 256
    assert {tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token} == {"<pad>", "<s>", "</s>", "<unk>"}
    line = zoo_mod.task_texts("sum", 0, 1)[0]
    ids = tok(line).input_ids
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == line
    for name in ("tokenizer", "llama_base", "mistral_base", "gpt2_base"):
        assert AutoTokenizer.from_pretrained(zoo[name])(line).input_ids == ids, name


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2"])
def test_base_configs(zoo, arch):
    from transformers import AutoConfig

    folder = zoo[f"{arch}_base"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    cfg = AutoConfig.from_pretrained(folder)
    assert cfg.model_type == arch and cfg.num_hidden_layers == 2 and cfg.num_attention_heads == 4
    for tid in (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id):
        assert 0 <= tid < cfg.vocab_size
    w = weights(folder)
    assert all(t.dtype == torch.float32 for t in w.values())
    if arch == "gpt2":
        assert cfg.tie_word_embeddings and "lm_head.weight" not in w
    else:
        assert not cfg.tie_word_embeddings and cfg.num_key_value_heads == 2
        assert not torch.equal(w["lm_head.weight"], w["model.embed_tokens.weight"])


def test_build_base_pads_the_vocabulary(zoo, tmp_path):
    folder = zoo_mod.build_base("mistral", tmp_path / "m", zoo["tokenizer"], seed=3, vocab_size=256)
    assert weights(folder)["lm_head.weight"].shape == (256, zoo_mod.HIDDEN)
    with pytest.raises(ValueError):
        zoo_mod.build_base("llama", tmp_path / "l", zoo["tokenizer"], vocab_size=8)


@pytest.mark.parametrize("name", sorted(FINETUNES))
def test_finetunes_move_every_tensor(zoo, name):
    base, ft = weights(zoo[FINETUNES[name]]), weights(zoo[name])
    assert set(base) == set(ft)
    for k, b in base.items():
        f = ft[k]
        assert f.dtype == torch.float32, k
        if name == "llama_resized" and k in ("model.embed_tokens.weight", "lm_head.weight"):
            assert f.shape[0] == b.shape[0] + 8 and f.shape[1:] == b.shape[1:], k
            f = f[: b.shape[0]]
        assert f.shape == b.shape, k
        still = (f == b).nonzero()
        if k.endswith("embed_tokens.weight"):  # the <pad> row (padding_idx) is zero and gets no gradient
            assert not b[0].any() and still[:, 0].eq(0).all(), k
        else:  # every element moved: no exact zero deltas to tie in top-k / TIES
            assert still.numel() == 0, f"{name}: {len(still)} elements of {k} did not move"


def test_finetunes_are_distinct_tasks(zoo):
    base = weights(zoo["llama_base"])
    taus = [{k: v - base[k] for k, v in weights(zoo[n]).items()} for n in ("llama_ft_a", "llama_ft_b", "llama_ft_c")]
    k = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(taus[0][k], taus[1][k]) and not torch.allclose(taus[1][k], taus[2][k])


def test_resized_vocabulary(zoo):
    from transformers import AutoConfig

    base_cfg, cfg = AutoConfig.from_pretrained(zoo["llama_base"]), AutoConfig.from_pretrained(zoo["llama_resized"])
    assert cfg.vocab_size == base_cfg.vocab_size + 8
    tok = zoo_mod.load_tokenizer(zoo["llama_resized"])
    assert len(tok) == cfg.vocab_size and tok.convert_tokens_to_ids(zoo_mod.ADDED_TOKENS[0]) == base_cfg.vocab_size


def test_other_arch_mismatches(zoo):
    base, other = weights(zoo["llama_base"]), weights(zoo["llama_other_arch"])
    assert set(base) == set(other)
    assert other["model.embed_tokens.weight"].shape[1] == 48 != base["model.embed_tokens.weight"].shape[1]


def test_finetune_loads_and_generates(zoo):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(zoo["llama_ft_a"])
    tok = zoo_mod.load_tokenizer(zoo["llama_ft_a"])
    out = model.generate(**tok("up: 3 4", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 3


# ---------------------------------------------------------------- adapters
@pytest.mark.parametrize("name", ADAPTERS)
def test_adapter_loads_in_peft_and_was_trained(zoo, name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = need(zoo, name)
    cfg = adapter_config(folder)
    assert Path(cfg["base_model_name_or_path"]) == zoo["gpt2_base" if name.startswith("gpt2") else "llama_base"]
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"])
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        before = base(ids).logits
    model = PeftModel.from_pretrained(base, folder)
    with torch.no_grad():
        after = model(ids).logits
    assert not torch.allclose(before, after), "adapter does not change the output"
    # PEFT initialises lora_B (Linear/Conv1D) and lora_embedding_A (Embedding) to zero: training moved them
    saved = adapter_weights(folder)
    zero_init = [k for k in saved if k.endswith(".lora_B.weight") or k.endswith(".lora_embedding_A")]
    assert zero_init and all((saved[k].abs().amax(dim=-1) > 0).all() for k in zero_init)
    live = [p for n, p in model.named_parameters() if ".lora_B." in n or ".lora_embedding_A." in n]
    assert len(live) == len(zero_init) and all(p.abs().max() > 0 for p in live)


@pytest.mark.parametrize("name", ["lora_dora", "gpt2_dora"])
def test_dora_magnitude_moved(zoo, name):
    folder = need(zoo, name)
    base = weights(zoo["gpt2_base" if name.startswith("gpt2") else "llama_base"])
    saved = adapter_weights(folder)
    mags = {k: v for k, v in saved.items() if k.endswith(".lora_magnitude_vector")}
    assert mags
    for k, m in mags.items():
        w = base[k.removeprefix("base_model.model.").replace(".lora_magnitude_vector", ".weight")]
        if name.startswith("gpt2"):
            w = w.T  # Conv1D stores [in, out]
        assert m.shape == (w.shape[0],)
        assert not torch.allclose(m, w.norm(dim=1)), f"{k}: magnitude still at its init"


def test_rank_and_alpha_patterns(zoo):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = zoo["lora_patterns"]
    saved = adapter_weights(folder)
    rank = {k.removesuffix(".lora_A.weight"): v.shape[0] for k, v in saved.items() if k.endswith(".lora_A.weight")}
    pre = "base_model.model.model.layers."
    assert rank[pre + "0.mlp.down_proj"] == rank[pre + "1.mlp.down_proj"] == 2
    assert rank[pre + "1.self_attn.q_proj"] == 8 and rank[pre + "0.self_attn.q_proj"] == 4
    assert len(rank) == 14 and sum(r == 4 for r in rank.values()) == 11
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo["llama_base"]), folder)
    layer = model.base_model.model.model.layers[1]
    assert layer.self_attn.o_proj.scaling["default"] == 32 / 4
    assert layer.self_attn.q_proj.scaling["default"] == 8 / 8
    assert layer.mlp.down_proj.scaling["default"] == 8 / 2


def test_rslora_scaling(zoo):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo["llama_base"]), zoo["lora_rslora"])
    assert model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(16 / 4**0.5)


def test_embedding_lora_keys(zoo):
    saved = adapter_weights(zoo["lora_embedding"])
    base = weights(zoo["llama_base"])
    pre = "base_model.model.model.embed_tokens."
    vocab, hidden = base["model.embed_tokens.weight"].shape
    assert saved[pre + "lora_embedding_A"].shape == (4, vocab)  # zero-initialised; delta = (B @ A).T * scaling
    assert saved[pre + "lora_embedding_B"].shape == (hidden, 4)
    moved = saved[pre + "lora_embedding_A"].abs().amax(dim=0) > 0
    assert moved.sum() == vocab - 1 and not moved[0]  # every token but <pad> (padding_idx: no gradient)
    # PEFT's save_embedding_layers="auto" also stores the (unchanged) base embedding
    assert torch.equal(saved[pre + "base_layer.weight"], base["model.embed_tokens.weight"])


def test_modules_to_save_keys(zoo):
    saved = adapter_weights(zoo["lora_mts"])
    base = weights(zoo["llama_base"])
    head = saved["base_model.model.lm_head.weight"]
    assert head.shape == base["lm_head.weight"].shape and not torch.equal(head, base["lm_head.weight"])
    assert not any("modules_to_save" in k for k in saved)


def test_gpt2_conv1d_delta_is_transposed(zoo):
    """fan_in_fan_out: lora_B @ lora_A is [out, in]; the Conv1D weight (and its delta) is [in, out]."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = zoo["gpt2_lora"]
    cfg, saved, base = adapter_config(folder), adapter_weights(folder), weights(zoo["gpt2_base"])
    assert cfg["fan_in_fan_out"] is True
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo["gpt2_base"]), folder).merge_and_unload()
    merged = merged.state_dict()
    name = "transformer.h.0.attn.c_attn"
    a, b = saved[f"base_model.model.{name}.lora_A.weight"], saved[f"base_model.model.{name}.lora_B.weight"]
    delta = (b @ a).T * (cfg["lora_alpha"] / cfg["r"])
    assert delta.shape == base[f"{name}.weight"].shape
    torch.testing.assert_close(merged[f"{name}.weight"] - base[f"{name}.weight"], delta, rtol=1e-4, atol=1e-6)


def test_task_types(zoo):
    assert adapter_config(zoo["lora_b"])["task_type"] is None
    assert adapter_config(zoo["lora_plain"])["task_type"] == "CAUSAL_LM"


# ---------------------------------------------------------------- offline Hub cache
def test_populate_hf_cache_resolves_offline(zoo, monkeypatch):
    import huggingface_hub.constants as c
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    hf_home = Path(c.HF_HUB_CACHE).parent
    assert str(hf_home) == os.environ["HF_HOME"]  # conftest's private HF_HOME
    sha = populate_hf_cache(hf_home, "zoo-org/llama-ft-a", zoo["llama_ft_a"])
    assert len(sha) == 40 and populate_hf_cache(hf_home, "zoo-org/llama-ft-a", zoo["llama_ft_a"]) == sha  # content hash
    repo = hf_home / "hub" / "models--zoo-org--llama-ft-a"
    assert (repo / "refs" / "main").read_text() == sha

    folder = Path(snapshot_download("zoo-org/llama-ft-a"))
    assert folder == repo / "snapshots" / sha and (folder / "config.json").is_file()
    assert Path(snapshot_download("zoo-org/llama-ft-a", revision=sha)) == folder
    assert Path(snapshot_download("zoo-org/llama-ft-a", allow_patterns=["*.json"])) == folder
    with pytest.raises(LocalEntryNotFoundError):
        snapshot_download("zoo-org/not-there")

    pinned = populate_hf_cache(hf_home, "zoo-org/llama-base", zoo["llama_base"], commit_sha="ab" * 20)
    assert pinned == "ab" * 20
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained("zoo-org/llama-base")
    torch.testing.assert_close(model.state_dict()["lm_head.weight"], weights(zoo["llama_base"])["lm_head.weight"])
    with pytest.raises(ValueError):
        populate_hf_cache(hf_home, "zoo-org/bad", zoo["llama_base"], commit_sha="main")


def test_safetensors_headers_are_readable_lazily(zoo):
    with safe_open(zoo["llama_base"] / "model.safetensors", "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_shape()[1] == zoo_mod.HIDDEN
