"""The demo's models, built offline: tokenizer, tiny Llama base, full finetunes and PEFT LoRAs.

Everything trains on the ``train`` splits of the shipped ``taskarith_*`` tasks
(``recipes/tasks/data/<task>_train.jsonl``), which share no example with the validation and
test splits the merges are tuned and scored on.

* pretraining: causal-LM loss on every token of a corpus that mixes several skills (see
  :func:`pretraining_corpus`);
* finetunes: the loss on the answer only (prompt tokens masked), one pass over the task's
  ``train`` rows per epoch, each batch topped up with replayed pretraining lines (so a finetune
  learns its task without unlearning the base's skills; not the unwanted finetune U, whose
  vector is negated: replay would put pretraining directions into it); each saves its epoch-1
  checkpoint too (for the one-epoch vs converged comparison).

The training set-up (what makes addition and negation show at this scale) was found by
measurement; see the README's demo section for the numbers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

logger = logging.getLogger("hf_taskarith.demo")

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
DIGITS = [str(i) for i in range(10)]
LETTERS = list("abcdefgh")
WORDS = ["up", "down", "sum", "rev", ":", "="]


@dataclass(frozen=True)
class Finetune:
    """One finetune of the demo: which task, full or LoRA, and how long."""

    name: str
    task: str  # data file stem in recipes/tasks/data (``<task>_train.jsonl``)
    kind: str  # "full" or "lora"
    epochs: int
    lr: float
    batch_size: int = 8
    rank: int = 8
    answer_only: bool = True  # loss on the answer only (prompt tokens masked), as in SFT
    replay: float = 0.0  # pretraining lines per task example in each batch (limits forgetting)
    targets: Tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # LoRA


@dataclass(frozen=True)
class DemoConfig:
    """Everything that decides the demo's models and numbers (its hash keys the cache)."""

    seed: int = 0
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    pretrain_steps: int = 600
    pretrain_lr: float = 3e-3
    pretrain_batch: int = 32
    up_reps: int = 20  # copies of the count-up cycles in the pretraining corpus
    letters_reps: int = 10  # copies of the a-e letter runs (the format, a weak skill)
    letters_down_reps: int = 1  # copies of the backward letter runs (a partial skill)...
    letters_down_lines: int = 4  # ...of this many of its train runs
    rev_lines: int = 200  # reversal examples in the pretraining corpus (a partial skill)
    finetunes: Tuple[Finetune, ...] = (
        Finetune("count_down", "count_down", "full", epochs=40, lr=1e-3, batch_size=6, replay=2.0),
        Finetune("letters", "letters", "lora", epochs=60, lr=5e-3, batch_size=7, rank=8, replay=1.0),
        Finetune("count_down_lora", "count_down", "lora", epochs=60, lr=3e-3, batch_size=6, rank=8, replay=1.0),
        # no replay for U: replayed pretraining lines add a "more pretraining" part to τ_U (the control
        # among them), which negation then subtracts (with replay, seed 2 could not cut U far
        # enough on test at any λ that kept the control)
        Finetune("letters_down", "letters_down", "full", epochs=40, lr=1e-3, batch_size=7, replay=0.0),
    )
    threads: int = 1  # tiny matrices: one thread is faster than two, and far faster on a busy machine

    def to_dict(self) -> Dict:
        return asdict(self)


def data_dir() -> Path:
    """``recipes/tasks/data`` of this installation (the shipped task data)."""
    from ..evaluation import shipped_tasks_dir
    from ..errors import TaskArithError

    tasks = shipped_tasks_dir()
    if tasks is None or not (tasks / "data").is_dir():
        raise TaskArithError("demo: the shipped recipes/tasks folder is missing (run from a source checkout)")
    return tasks / "data"


def read_rows(task: str, split: str) -> List[Dict]:
    """Rows ``{"prompt", "answer", ...}`` of ``recipes/tasks/data/<task>_<split>.jsonl``."""
    from ..errors import TaskArithError

    path = data_dir() / f"{task}_{split}.jsonl"
    if not path.is_file():
        raise TaskArithError(f"demo: {path} is missing (run recipes/tasks/make_data.py)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def data_fingerprint() -> str:
    """A hash of every task data file (a change of data rebuilds the models)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(data_dir().glob("*.jsonl")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------- corpus
def pretraining_corpus(cfg: "DemoConfig") -> List[str]:
    """The base's corpus: several skills at different strengths.

    * counting up: whole cycles ``up : 3 4 5 6 7 8 9 0 1 2 3`` from every start: learned well,
      the control skill (a skill the base has; finetunes and merges should not destroy it);
    * counting letters down (``down : c b a h``): a third of the ``train`` runs, once: the base
      does it for some runs, the unwanted behaviour, partly present as in real pretraining data;
    * letter runs forwards within ``a``-``e``: the format, a weak skill;
    * counting digits down: only ``train`` prompts of up to three digits: the format, barely the skill;
    * reversal: a third of the ``train`` strings (a skill the finetunes do not train);
    * noise: random digit and letter strings, and ``rev``/``sum`` prompts without answers.
    """
    rng = random.Random(cfg.seed)
    up = ["up : " + " ".join(DIGITS[(s + i) % 10] for i in range(11)) for s in range(10)]
    letters = [" ".join(LETTERS[s:e]) for s in range(5) for e in range(s + 2, 6)]
    letters_down = [f"{r['prompt']} {r['answer']}" for r in read_rows("letters_down", "train")[: cfg.letters_down_lines]]
    down = [f"{r['prompt']} {r['answer']}" for r in read_rows("count_down", "train") if len(r["prompt"].split()) <= 4]
    rev = [f"{r['prompt']} {r['answer']}" for r in read_rows("rev", "train")[: cfg.rev_lines]]
    lines: List[str] = []
    lines += up * cfg.up_reps
    lines += letters_down * cfg.letters_down_reps
    lines += letters * cfg.letters_reps
    lines += down
    lines += rev
    for _ in range(150):
        lines.append(" ".join(rng.choice(DIGITS) for _ in range(rng.randint(2, 8))))
        lines.append(" ".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 6))))
        seq = [rng.choice(DIGITS) for _ in range(rng.randint(2, 4))]
        lines.append(rng.choice(["rev", "sum"]) + " : " + " ".join(seq) + " =")
    rng.shuffle(lines)
    return lines


def finetune_examples(task: str) -> List[Tuple[str, str]]:
    """``[(prompt, answer)]`` of a task's train split: the finetune's data set."""
    return [(r["prompt"], r["answer"]) for r in read_rows(task, "train")]


# ---------------------------------------------------------------------------- tokenizer / model
@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence transformers/PEFT chatter while building."""
    from transformers.utils import logging as tlog

    verbosity = tlog.get_verbosity()
    bars = tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*save_embedding_layers.*")
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        tlog.set_verbosity(verbosity)
        if bars:
            tlog.enable_progress_bar()


def train_tokenizer(corpus: Sequence[str], folder: Path):
    """A word-level tokenizer trained with ``tokenizers`` (whitespace words; no BOS, as lm-eval
    scores these tasks without one), saved as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    # Every word of the task vocabulary, even those the corpus lacks (eval prompts must never be <unk>).
    extra = [" ".join(DIGITS + LETTERS + WORDS)]
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIALS, min_frequency=1, show_progress=False)
    tok.train_from_iterator(list(corpus) + extra, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=32,
    )
    fast.save_pretrained(folder)
    return fast


def new_base(cfg: DemoConfig, tok):
    """A randomly initialised tiny Llama sized for the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=32, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


# ---------------------------------------------------------------------------- training
def _batch(tok, texts: Sequence[str], prompts: Optional[Sequence[str]] = None):
    """Tokenised batch; labels -100 on padding and, when ``prompts`` are given, on the prompt."""
    enc = tok(list(texts), return_tensors="pt", padding=True)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    if prompts is not None:
        for i, p in enumerate(prompts):
            if p:
                labels[i, : len(tok(p).input_ids)] = -100
    return enc, labels


def pretrain(model, tok, corpus: Sequence[str], cfg: DemoConfig, progress=None) -> float:
    """``cfg.pretrain_steps`` AdamW steps (cosine schedule) of causal-LM loss on ``corpus``."""
    rng = random.Random(cfg.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.pretrain_lr, total_steps=cfg.pretrain_steps,
                                                pct_start=0.1)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(cfg.pretrain_steps):
        enc, labels = _batch(tok, rng.sample(list(corpus), cfg.pretrain_batch))
        loss = model(**enc, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if progress is not None:
            progress.update(1)
    model.eval()
    return loss.item()


def finetune(model, tok, examples: Sequence[Tuple[str, str]], spec: Finetune, seed: int,
             on_epoch=None, progress=None, replay: Sequence[str] = ()) -> float:
    """AdamW on causal-LM loss (every token, or the answer only), ``spec.epochs`` passes over
    ``examples`` (shuffled each epoch). With ``replay`` lines, every batch also holds
    ``spec.replay × batch_size`` of them (loss on every token): pretraining data replayed to
    limit forgetting.

    ``on_epoch(epoch, model)`` is called after each epoch (the demo saves epoch 1).
    """
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(0.0)
    data = list(examples)
    for epoch in range(1, spec.epochs + 1):
        rng.shuffle(data)
        for i in range(0, len(data), spec.batch_size):
            chunk = data[i : i + spec.batch_size]
            texts = [f"{p} {a}" for p, a in chunk]
            prompts = [p if spec.answer_only else "" for p, _ in chunk]
            if replay and spec.replay > 0:
                extra = rng.sample(list(replay), round(spec.replay * spec.batch_size))
                texts, prompts = texts + extra, prompts + [""] * len(extra)
            enc, labels = _batch(tok, texts, prompts)
            loss = model(**enc, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            if progress is not None:
                progress.update(1)
        if on_epoch is not None:
            model.eval()
            on_epoch(epoch, model)
            model.train()
    model.eval()
    return loss.item()


def steps_of(spec: Finetune) -> int:
    n = len(finetune_examples(spec.task))
    return spec.epochs * -(-n // spec.batch_size)


def _hash(*parts) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def build_models(root: Path, cfg: DemoConfig, progress_factory=None) -> Dict[str, Path]:
    """Train (or reuse) the base and every finetune under ``root``; returns ``{name: folder}``.

    Names: ``base``, each finetune's name, and ``<name>@epoch1`` for its epoch-1 checkpoint.
    A folder counts as built when it holds a ``.done`` marker (written last). Folders are named
    by a hash of what built them (the base: its config and the task data; a finetune: that and
    its own spec), so changing one finetune retrains only that finetune.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    base_key = _hash({k: v for k, v in cfg.to_dict().items() if k not in ("finetunes", "threads")},
                     data_fingerprint())
    paths: Dict[str, Path] = {"base": root / f"base-{base_key}"}
    for ft in cfg.finetunes:
        key = _hash(base_key, asdict(ft))
        paths[ft.name] = root / f"{ft.name}-{key}"
        paths[f"{ft.name}@epoch1"] = root / f"{ft.name}-{key}-epoch1"
    if all((p / ".done").is_file() for p in paths.values()):
        return paths

    def bar(total: int, desc: str):
        return progress_factory(total, desc) if progress_factory else contextlib.nullcontext(None)

    with quiet():
        base_dir = paths["base"]
        if not (base_dir / ".done").is_file():
            corpus = pretraining_corpus(cfg)
            tok = train_tokenizer(corpus, base_dir)
            model = new_base(cfg, tok)
            with bar(cfg.pretrain_steps, "pretrain base") as pb:
                loss = pretrain(model, tok, corpus, cfg, pb)
            logger.info("pretrained the base: %d steps on %d lines, final loss %.3f", cfg.pretrain_steps, len(corpus), loss)
            model.save_pretrained(base_dir)
            (base_dir / ".done").touch()
        tok = PreTrainedTokenizerFast.from_pretrained(base_dir)
        corpus_lines = pretraining_corpus(cfg)

        for i, ft in enumerate(cfg.finetunes):
            out, first = paths[ft.name], paths[f"{ft.name}@epoch1"]
            if (out / ".done").is_file() and (first / ".done").is_file():
                continue
            torch.manual_seed(cfg.seed + 100 + i)
            model = AutoModelForCausalLM.from_pretrained(base_dir)
            if ft.kind == "lora":
                model = get_peft_model(model, LoraConfig(r=ft.rank, lora_alpha=2 * ft.rank, lora_dropout=0.0,
                                                         target_modules=list(ft.targets), task_type="CAUSAL_LM"))

            def save(folder: Path, m) -> None:
                m.save_pretrained(folder)
                if ft.kind == "full":
                    tok.save_pretrained(folder)
                (folder / ".done").touch()

            def on_epoch(epoch: int, m) -> None:
                if epoch == 1:
                    save(first, m)

            with bar(steps_of(ft), f"finetune {ft.name} ({ft.kind})") as pb:
                loss = finetune(model, tok, finetune_examples(ft.task), ft, cfg.seed + 200 + i, on_epoch, pb,
                                replay=corpus_lines)
            logger.info("finetuned %s (%s, %d epochs): final loss %.3f", ft.name, ft.kind, ft.epochs, loss)
            save(out, model)
    return paths
