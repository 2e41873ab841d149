"""A tiny, offline model zoo for the tests: real configs, real optimizer steps, real PEFT adapters.

Everything is built locally in a few seconds: a word-level tokenizer trained with ``tokenizers``,
tiny Llama / Mistral / GPT-2 bases, full finetunes (AdamW steps on causal-LM loss) and PEFT LoRA
adapters of every variant the task-vector code supports.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Dict, Optional

import torch

ZOO_VERSION = "3"
WORDS = [str(i) for i in range(10)] + list("abcdefgh") + ["up", "down", "sum", "rev", ":", "="]


def train_tokenizer(out_dir: Path) -> Path:
    """A word-level tokenizer trained with ``tokenizers`` on a synthetic corpus, saved HF-style."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(200)]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(out_dir)
    return Path(out_dir)


def _tokenizer(tokenizer_dir: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)


def build_base(arch: str, out_dir: Path, tokenizer_dir: Path, seed: int = 0, hidden: int = 32) -> Path:
    """A tiny randomly initialised base model saved in fp32 safetensors with tokenizer files."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    tok = _tokenizer(tokenizer_dir)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=len(tok), n_embd=hidden, n_layer=2, n_head=4, n_positions=64, **ids)
        model = GPT2LMHeadModel(cfg)
    else:
        common = dict(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, **ids,
        )
        model = MistralForCausalLM(MistralConfig(**common)) if arch == "mistral" else LlamaForCausalLM(LlamaConfig(**common))
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return Path(out_dir)


def _texts(seed: int, n: int = 8):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(n)]


def _train(model, tok, seed: int, steps: int, lr: float) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        batch = tok(_texts(seed * 100 + step), return_tensors="pt", padding=True)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def finetune(base_dir: Path, out_dir: Path, seed: int, steps: int = 3, lr: float = 1e-2, resize_to: Optional[int] = None) -> Path:
    """A full finetune: a few AdamW steps of causal-LM loss from the base."""
    from transformers import AutoModelForCausalLM

    tok = _tokenizer(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if resize_to:
        model.resize_token_embeddings(resize_to)
    with torch.no_grad():  # unused embedding rows get no gradient: nudge every tensor so each one moves
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-4)
    _train(model, tok, seed, steps, lr)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return Path(out_dir)


def train_adapter(base_dir: Path, out_dir: Path, seed: int, steps: int = 3, lr: float = 1e-2, **lora_kwargs) -> Path:
    """A real PEFT LoRA adapter: AdamW steps move lora_B off zero (and DoRA magnitudes)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tok = _tokenizer(base_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), LoraConfig(**lora_kwargs))
    _train(model, tok, seed, steps, lr)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(out_dir)
    return Path(out_dir)


def populate_hf_cache(hf_home: Path, repo_id: str, folder: Path, commit_sha: Optional[str] = None) -> str:
    """Copy ``folder`` into the Hub cache layout so ``HF_HUB_OFFLINE=1`` resolves ``repo_id``."""
    sha = commit_sha or hashlib.sha1(f"{repo_id}:{folder}".encode()).hexdigest()
    repo = Path(hf_home) / "hub" / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / sha
    if snap.exists():
        shutil.rmtree(snap)
    shutil.copytree(folder, snap)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(sha)
    return sha


def build_zoo(root: Path) -> Dict[str, Path]:
    """Build (or reuse) every fixture model under ``root``; returns name -> folder."""
    root = Path(root)
    index = root / "zoo.json"
    if index.is_file():
        data = json.loads(index.read_text())
        if data.get("version") == ZOO_VERSION:
            return {k: Path(v) for k, v in data["paths"].items()}
    root.mkdir(parents=True, exist_ok=True)
    z: Dict[str, Path] = {"tokenizer": train_tokenizer(root / "tokenizer")}
    for arch in ("llama", "mistral", "gpt2"):
        z[f"{arch}_base"] = build_base(arch, root / f"{arch}_base", z["tokenizer"])
        z[f"{arch}_ft_a"] = finetune(z[f"{arch}_base"], root / f"{arch}_ft_a", seed=1)
    z["llama_ft_b"] = finetune(z["llama_base"], root / "llama_ft_b", seed=2)
    z["llama_ft_c"] = finetune(z["llama_base"], root / "llama_ft_c", seed=3)
    z["llama_resized"] = finetune(z["llama_base"], root / "llama_resized", seed=4, resize_to=len(_tokenizer(z["tokenizer"])) + 8)
    z["llama_other_arch"] = build_base("llama", root / "llama_other_arch", z["tokenizer"], hidden=48)
    base = z["llama_base"]
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
    adapters = {
        "lora_plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "lora_rslora": dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"]),
        "lora_dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=attn),
        "lora_patterns": dict(
            r=4, lora_alpha=8, target_modules=attn + ["gate_proj", "up_proj", "down_proj"],
            rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 32},
        ),
        "lora_embedding": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
        "lora_mts": dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
        "lora_b": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "up_proj"]),
    }
    for i, (name, kwargs) in enumerate(adapters.items()):
        z[name] = train_adapter(base, root / name, seed=10 + i, **kwargs)
    z["gpt2_lora"] = train_adapter(
        z["gpt2_base"], root / "gpt2_lora", seed=30, r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True
    )
    try:
        z["gpt2_dora"] = train_adapter(
            z["gpt2_base"], root / "gpt2_dora", seed=31, r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn"], fan_in_fan_out=True
        )
    except (ValueError, NotImplementedError, TypeError):
        pass  # this PEFT version refuses DoRA on Conv1D; the test skips it
    index.write_text(json.dumps({"version": ZOO_VERSION, "paths": {k: str(v) for k, v in z.items()}}, indent=1))
    return z
