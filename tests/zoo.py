"""A tiny, offline model zoo for the tests: real configs, real optimizer steps, real PEFT adapters.

Everything is built locally in a few seconds on CPU: a BPE tokenizer trained with ``tokenizers``,
tiny Llama / Mistral / GPT-2 bases, full finetunes (AdamW steps on causal-LM loss) and PEFT LoRA
adapters of every variant the task-vector code reads. Plain module, no pytest dependency::

    from zoo import build_zoo
    zoo = build_zoo("/tmp/zoo")          # name -> folder, cached by <root>/zoo.json
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

ZOO_VERSION = "4"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = [
    "up", "down", "rev", "sum", "copy", "sort", "count", "add", "sub", "red", "green", "blue", "cat", "dog",
    "bird", "fish", "one", "two", "three", "four", "five", "yes", "no", "the", "a", "is", "of", "and", "to", "in",
]
LETTERS = "abcdefghijklmnopqrstuvwxyz"
ADDED_TOKENS = [f"<extra_{i}>" for i in range(8)]  # what llama_resized adds to its tokenizer
HIDDEN = 32
MAX_POSITIONS = 64


# ---------------------------------------------------------------- text
def task_texts(task: str, seed: int, n: int = 8) -> List[str]:
    """``n`` short synthetic lines of one "task" (distinct tasks give distinct task vectors)."""
    rng = random.Random(f"{task}:{seed}")
    out = []
    for _ in range(n):
        if task == "up":
            s = rng.randrange(90)
            out.append("up: " + " ".join(str(s + i) for i in range(8)))
        elif task == "down":
            s = rng.randrange(10, 99)
            out.append("down: " + " ".join(str(s - i) for i in range(8)))
        elif task == "rev":
            w = rng.sample(LETTERS, 5)
            out.append("rev: " + " ".join(w) + " = " + " ".join(reversed(w)))
        elif task == "sum":
            a, b = rng.randrange(50), rng.randrange(50)
            out.append(f"sum: {a} + {b} = {a + b}")
        elif task == "words":
            out.append(" ".join(rng.choice(WORDS) for _ in range(10)))
        elif task == "extra":  # uses the tokens llama_resized adds, so their new rows get gradients
            out.append(" ".join(rng.choice(ADDED_TOKENS + WORDS[:8]) for _ in range(10)))
        else:
            raise ValueError(f"unknown task {task!r}")
    return out


def _corpus(n: int = 400) -> List[str]:
    tasks = ["up", "down", "rev", "sum", "words"]
    return [line for i, t in enumerate(tasks) for line in task_texts(t, 1000 + i, n // len(tasks))]


from hf_taskarith.demo.build import quiet  # noqa: E402  (transformers/PEFT chatter off while building)


# ---------------------------------------------------------------- tokenizer
def train_tokenizer(out_dir: Path, vocab_size: int = 192) -> Path:
    """Train a small BPE tokenizer (Metaspace, BOS prepended) and save it as ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    alphabet = list(LETTERS + LETTERS.upper() + "0123456789:=+-.,!?")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=MAX_POSITIONS,
    )
    fast.save_pretrained(out_dir)
    return Path(out_dir)


def load_tokenizer(folder: Path):
    """Load a zoo tokenizer (``PreTrainedTokenizerFast`` sidesteps AutoTokenizer's per-arch rewrites)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(folder)


# ---------------------------------------------------------------- models
def build_base(
    arch: str, out_dir: Path, tokenizer_dir: Path, seed: int = 0, vocab_size: Optional[int] = None, hidden: int = HIDDEN
) -> Path:
    """A tiny randomly initialised ``arch`` model (llama | mistral | gpt2) saved in fp32 safetensors with tokenizer files."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    tok = load_tokenizer(tokenizer_dir)
    vocab = vocab_size or len(tok)
    if vocab < len(tok):
        raise ValueError(f"vocab_size {vocab} is smaller than the tokenizer ({len(tok)})")
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    if arch == "gpt2":  # GPT-2 keeps its default: lm_head tied to wte
        cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=2, n_head=4, n_positions=MAX_POSITIONS, **ids)
        model = GPT2LMHeadModel(cfg)
    elif arch in ("llama", "mistral"):
        cfg_cls, model_cls = (MistralConfig, MistralForCausalLM) if arch == "mistral" else (LlamaConfig, LlamaForCausalLM)
        cfg = cfg_cls(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
            tie_word_embeddings=False, **ids,
        )
        model = model_cls(cfg)
    else:
        raise ValueError(f"unknown arch {arch!r}")
    return _save(model.float(), tok, out_dir)


def _save(model, tok, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    if not (out_dir / "model.safetensors").is_file():
        raise RuntimeError(f"expected one model.safetensors in {out_dir}")
    return out_dir


def _train(model, tok, texts: Sequence[str], seed: int, steps: int, lr: float, weight_decay: float = 0.01) -> None:
    """``steps`` real AdamW steps of causal-LM loss on ``texts`` plus a vocabulary-coverage batch.

    The coverage rows hold every token id once (seeded order) and fill every position, so every embedding,
    position and lm_head row gets a gradient: every element moves (but the zero-initialised padding_idx row
    of Llama/Mistral embeddings, which gets no gradient) and |deltas| practically never tie (TIES / top-k
    comparisons against PEFT and mergekit stay well defined).
    """
    torch.manual_seed(seed)
    batch = tok(list(texts), return_tensors="pt", padding="max_length", max_length=MAX_POSITIONS, truncation=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    vocab, width = model.get_input_embeddings().weight.shape[0], MAX_POSITIONS  # full rows: every position is used
    perm = torch.randperm(vocab)
    perm = torch.cat([perm, perm[: (-vocab) % (width - 1)]]).view(-1, width - 1)  # wrap around to fill the last row
    # the last input of a row feeds no loss term: end each row with eos so every token id has a successor
    perm = torch.cat([perm, torch.full((perm.shape[0], 1), tok.eos_token_id)], dim=1)
    ids, mask = torch.cat([ids, perm]), torch.cat([mask, torch.ones_like(perm)])
    labels = ids.masked_fill(mask == 0, -100)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def finetune(
    base_dir: Path, out_dir: Path, seed: int, steps: int = 3, lr: float = 1e-2, texts: Optional[Sequence[str]] = None,
    add_tokens: Sequence[str] = (),
) -> Path:
    """A full finetune of ``base_dir``: AdamW steps of causal-LM loss on ``texts`` (see ``_train``).

    ``add_tokens`` adds tokens to the tokenizer and resizes the embeddings (and untied lm_head) first.
    """
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if add_tokens:
        tok.add_tokens(list(add_tokens))
        torch.manual_seed(seed)
        model.resize_token_embeddings(len(tok))
    _train(model, tok, texts or task_texts("words", seed), seed, steps, lr)
    return _save(model, tok, out_dir)


def train_adapter(base_dir: Path, out_dir: Path, seed: int, steps: int = 3, lr: float = 1e-2,
                  texts: Optional[Sequence[str]] = None, **lora_kwargs) -> Path:
    """A real PEFT LoRA adapter on ``base_dir``: AdamW steps move the zero-initialised factor (lora_B, or
    lora_embedding_A for embeddings) off zero, and DoRA magnitudes off their init. ``lora_kwargs`` go to LoraConfig."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)  # lora_A init
    model = get_peft_model(base, LoraConfig(**lora_kwargs))
    _train(model, tok, texts or task_texts("words", seed), seed, steps, lr, weight_decay=0.0)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(out_dir)
    return Path(out_dir)


# ---------------------------------------------------------------- Hub cache
def populate_hf_cache(
    hf_home: Path, repo_id: str, folder: Path, commit_sha: Optional[str] = None, repo_type: str = "model"
) -> str:
    """Copy ``folder`` into ``$HF_HOME/hub`` so ``HF_HUB_OFFLINE=1`` resolves ``repo_id`` (and ``@sha``).

    Writes ``hub/<type>s--ORG--NAME/refs/main`` (the 40-hex sha) and ``snapshots/<sha>/`` (plain file copies;
    no blobs/symlinks, which offline resolution does not need). The default sha hashes repo id and file
    contents, so the same content always gets the same sha. Returns the sha.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if commit_sha is None:
        h = hashlib.sha1(repo_id.encode())
        for p in files:
            h.update(p.relative_to(folder).as_posix().encode() + b"\0" + p.read_bytes())
        commit_sha = h.hexdigest()
    if not re.fullmatch(r"[0-9a-f]{40}", commit_sha):
        raise ValueError(f"commit_sha must be 40 lowercase hex characters, got {commit_sha!r}")
    repo = Path(hf_home) / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit_sha
    if snap.exists():
        shutil.rmtree(snap)
    shutil.copytree(folder, snap)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit_sha)  # no trailing newline, like huggingface_hub writes it
    return commit_sha


# ---------------------------------------------------------------- the zoo
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
LLAMA_ADAPTERS: Dict[str, dict] = {
    "lora_plain": dict(task="up", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "lora_rslora": dict(task="down", r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"]),
    "lora_dora": dict(task="rev", r=4, lora_alpha=8, use_dora=True, target_modules=ATTN),
    # PEFT pattern keys are regexes matched as re.match(rf"(.*\.)?({key})$", module_name); first match wins.
    "lora_patterns": dict(
        task="sum", r=4, lora_alpha=8, target_modules=ATTN + MLP,
        rank_pattern={"down_proj": 2, r"model\.layers\.1\.self_attn\.q_proj": 8}, alpha_pattern={"o_proj": 32},
    ),
    "lora_embedding": dict(task="words", r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    "lora_mts": dict(task="up", r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    # lora_b is saved without task_type (PEFT's default), the others as CAUSAL_LM.
    "lora_b": dict(task="down", r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "up_proj"], task_type=None),
}
GPT2_ADAPTERS: Dict[str, dict] = {
    "gpt2_lora": dict(task="up", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
    "gpt2_dora": dict(task="rev", r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn"], fan_in_fan_out=True),
}
NAMES = (
    ["tokenizer", "llama_base", "llama_ft_a", "llama_ft_b", "llama_ft_c", "mistral_base", "mistral_ft_a",
     "gpt2_base", "gpt2_ft_a", "llama_resized", "llama_other_arch"] + list(LLAMA_ADAPTERS) + list(GPT2_ADAPTERS)
)


def _load_index(root: Path) -> Optional[Dict[str, Path]]:
    index = root / "zoo.json"
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError):
        return None
    if data.get("version") != ZOO_VERSION:
        return None
    paths = {k: root / v for k, v in data["paths"].items()}
    return paths if all(p.is_dir() for p in paths.values()) else None


def build_zoo(root: Path) -> Dict[str, Path]:
    """Build (or reuse) every fixture under ``root``; returns name -> folder.

    Cached: if ``root/zoo.json`` carries ``ZOO_VERSION`` (and its folders exist) nothing is rebuilt.
    ``gpt2_dora`` is left out (reason in zoo.json "skipped") if the installed PEFT refuses DoRA on Conv1D.
    """
    root = Path(root).resolve()
    cached = _load_index(root)
    if cached is not None:
        return cached
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    (root / "zoo.json").unlink(missing_ok=True)
    for name in NAMES:  # a stale or half-built zoo: start each folder afresh
        if (root / name).exists():
            shutil.rmtree(root / name)
    skipped: Dict[str, str] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only add sync overhead (10x slower on a busy 2-core box)
    try:
        with quiet():
            z = _build(root, skipped)
    finally:
        torch.set_num_threads(threads)
    index = {
        "version": ZOO_VERSION,
        "paths": {k: v.relative_to(root).as_posix() for k, v in z.items()},
        "skipped": skipped,
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    (root / "zoo.json").write_text(json.dumps(index, indent=1))
    return z


def _build(root: Path, skipped: Dict[str, str]) -> Dict[str, Path]:
    z: Dict[str, Path] = {"tokenizer": train_tokenizer(root / "tokenizer")}
    for arch in ("llama", "mistral", "gpt2"):
        z[f"{arch}_base"] = build_base(arch, root / f"{arch}_base", z["tokenizer"], seed=0)
    for name, base, seed, task in [
        ("llama_ft_a", "llama_base", 1, "up"), ("llama_ft_b", "llama_base", 2, "down"),
        ("llama_ft_c", "llama_base", 3, "rev"), ("mistral_ft_a", "mistral_base", 1, "up"),
        ("gpt2_ft_a", "gpt2_base", 1, "up"),
    ]:
        z[name] = finetune(z[base], root / name, seed=seed, texts=task_texts(task, seed))
    z["llama_resized"] = finetune(
        z["llama_base"], root / "llama_resized", seed=4, texts=task_texts("extra", 4), add_tokens=ADDED_TOKENS
    )
    z["llama_other_arch"] = build_base("llama", root / "llama_other_arch", z["tokenizer"], seed=5, hidden=48)
    for base, specs, seed0 in [("llama_base", LLAMA_ADAPTERS, 10), ("gpt2_base", GPT2_ADAPTERS, 30)]:
        for i, (name, spec) in enumerate(specs.items()):
            spec = dict(spec)
            task = spec.pop("task")
            spec.setdefault("task_type", "CAUSAL_LM")
            try:
                z[name] = train_adapter(z[base], root / name, seed=seed0 + i, texts=task_texts(task, seed0 + i), **spec)
            except (ValueError, NotImplementedError, TypeError) as e:  # e.g. an older PEFT: no DoRA on Conv1D
                if name != "gpt2_dora":
                    raise
                skipped[name] = f"{type(e).__name__}: {e}"
                shutil.rmtree(root / name, ignore_errors=True)
    return z
