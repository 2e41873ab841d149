"""``make demo``: task arithmetic end to end, offline, on models built here in a minute.

1. trains a tiny word-level tokenizer and a tiny Llama base on random digit strings;
2. finetunes it fully on "count up" sequences and trains a PEFT LoRA on "count down" sequences;
3. builds task vectors from both, merges them (addition) and negates one (forgetting);
4. saves each merge with the streaming writer, reloads it with transformers and generates.

Run: ``python -m hf_taskarith.demo --out demo_output``. A second run reuses the built models.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path
from typing import Callable, List

import torch

logger = logging.getLogger("hf_taskarith.demo")

DIGITS = [str(i) for i in range(10)]


def count_up(rng: random.Random) -> str:
    start = rng.randrange(0, 5)
    return "up : " + " ".join(DIGITS[start : start + 6])


def count_down(rng: random.Random) -> str:
    start = rng.randrange(5, 10)
    return "down : " + " ".join(reversed(DIGITS[start - 5 : start + 1]))


def noise(rng: random.Random) -> str:
    return "mix : " + " ".join(rng.choice(DIGITS) for _ in range(6))


def build_tokenizer(folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", "up", "down", "mix", ":"] + DIGITS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)
    return fast


def train(model, tokenizer, make: Callable[[random.Random], str], steps: int, lr: float, seed: int) -> float:
    """A few real AdamW steps of causal-LM loss on generated sequences; returns the last loss."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        batch = tokenizer([make(rng) for _ in range(16)], return_tensors="pt", padding=True)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return loss.item()


def build_models(root: Path) -> dict:
    """Base, full finetune and LoRA adapter under ``root`` (reused when present)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    paths = {k: root / k for k in ("base", "ft_up", "lora_down")}
    if all((p / "done").exists() for p in paths.values()):
        return paths
    tok = build_tokenizer(paths["base"])
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    # The base learns the format and the digits, not the skills: each skill comes from its finetune.
    logger.info("pretraining the base on random digit strings (loss %.2f)", train(base, tok, noise, 60, 3e-3, 0))
    base.save_pretrained(paths["base"])
    (paths["base"] / "done").touch()

    ft = AutoModelForCausalLM.from_pretrained(paths["base"])
    logger.info("full finetune on count-up (loss %.2f)", train(ft, tok, count_up, 40, 2e-3, 1))
    ft.save_pretrained(paths["ft_up"])
    tok.save_pretrained(paths["ft_up"])
    (paths["ft_up"] / "done").touch()

    lora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(paths["base"]),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
    )
    logger.info("LoRA on count-down (loss %.2f)", train(lora, tok, count_down, 120, 2e-2, 2))
    lora.save_pretrained(paths["lora_down"])
    (paths["lora_down"] / "done").touch()
    return paths


def accuracy(model, tokenizer, make: Callable[[random.Random], str], n: int = 40) -> float:
    """Greedy next-digit accuracy after the first three digits of each sequence."""
    rng = random.Random(1234)
    hits = total = 0
    for _ in range(n):
        words = make(rng).split()
        for cut in range(5, len(words)):
            ids = tokenizer(" ".join(words[:cut]), return_tensors="pt").input_ids
            with torch.no_grad():
                pred = model(ids).logits[0, -1].argmax().item()
            hits += tokenizer.convert_ids_to_tokens(pred) == words[cut]
            total += 1
    return hits / total


def main(argv: List[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from . import BaseModel, TaskVector

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_output", help="output folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    start = time.time()
    paths = build_models(out / "models")
    tok = PreTrainedTokenizerFast.from_pretrained(paths["base"])

    base = BaseModel(paths["base"])
    tv_up = TaskVector.from_models(base, paths["ft_up"])
    tv_down = TaskVector.from_adapter(paths["lora_down"])
    merges = {
        "base + τ_up + τ_down (addition)": (tv_up + tv_down).apply_to(base),
        "base − τ_down (negation)": base - tv_down,
    }
    models = {
        "base": AutoModelForCausalLM.from_pretrained(paths["base"]),
        "finetune up (full)": AutoModelForCausalLM.from_pretrained(paths["ft_up"]),
        "base + τ_down (LoRA)": tv_down.apply_to(base).to_model(),
    }
    for i, (label, merged) in enumerate(merges.items()):
        folder = merged.save_pretrained(out / f"merge_{i}", overwrite=True, progress=False)
        models[label] = AutoModelForCausalLM.from_pretrained(folder)
    rows = []
    print(f"\n{'model':36s} {'count-up acc':>13s} {'count-down acc':>15s}")
    for label, model in models.items():
        up, down = accuracy(model, tok, count_up), accuracy(model, tok, count_down)
        rows.append({"model": label, "count_up": up, "count_down": down})
        print(f"{label:36s} {up:13.2f} {down:15.2f}")
    prompt = tok("up : 2 3", return_tensors="pt").input_ids
    gen = models["base + τ_up + τ_down (addition)"].generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    print("\nmerged model generates:", tok.decode(gen[0], skip_special_tokens=True))
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"results in {out / 'results.json'}; merged models in {out}/merge_*; {time.time() - start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
