"""Gradient task vectors: τ = −η Σ_b ∇L_b(θ0), checked against real torch.optim.SGD steps.

The references are computed with transformers' own causal-LM loss (``model(..., labels=...).loss``)
and ``torch.optim.SGD`` in float64: θ1 − θ0 of an fp32 finetune carries rounding errors of order
ulp(θ0) (6e-8 for a LayerNorm weight of 1.0), which is 1e-3 of a small τ, so an fp32 SGD step
could not check 1e-5 relative agreement; a float64 step can (and is fully independent of our code).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_taskarith import BaseModel, DatasetError, StoredTaskVector, TaskArithError, TaskVector
from hf_taskarith.cli import main as cli_main

from zoo import task_texts

LR = 0.05


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def texts():
    return task_texts("up", 7, 6) + task_texts("sum", 8, 4)


def _sgd_reference(base_dir, batches, lr, prompt_lens=None):
    """θ1 − θ0 after plain SGD (no momentum, no weight decay) in float64, every batch's gradient
    taken at θ0 and summed (one step per batch with the gradients frozen at θ0 = one optimizer step on
    the summed gradient). ``batches`` is a list of lists of texts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64)
    model.eval()
    theta0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0, weight_decay=0.0)
    opt.zero_grad()
    for texts in batches:
        enc = tok(list(texts), return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        if prompt_lens is not None:
            for i, text in enumerate(texts):
                labels[i, : prompt_lens[text]] = -100
        model(**enc, labels=labels).loss.backward()  # .grad accumulates Σ_b ∇L_b(θ0)
    opt.step()
    return {k: (p.detach() - theta0[k]) for k, p in model.named_parameters()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def _assert_close(tv: StoredTaskVector, ref: dict, tol: float = 1e-5):
    assert set(tv.keys()) == set(ref), set(tv.keys()) ^ set(ref)
    for name, want in ref.items():
        assert _rel(tv.store.get(name), want) < tol, name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_full_batch_gd_step_equals_from_gradient(zoo, tmp_path, texts, arch):
    base = zoo[f"{arch}_base"]
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    tv = TaskVector.from_gradient(base, data, lr=LR, micro_batch_size=3, device="cpu")
    ref = _sgd_reference(base, [texts], LR)  # one full batch, one GD step
    ref = {k: v for k, v in ref.items() if k in BaseModel(base).store}  # GPT-2's tied lm_head is not stored
    _assert_close(tv, ref)
    assert tv.metadata["form"] == "full_batch_mean" and tv.metadata["num_examples"] == len(texts)


def test_sum_over_batches_equals_summed_batch_gradients(zoo, tmp_path, texts):
    base = zoo["llama_base"]
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    tv = TaskVector.from_gradient(base, data, lr=LR, batch_size=4, micro_batch_size=3, device="cpu")
    ref = _sgd_reference(base, [texts[0:4], texts[4:8], texts[8:10]], LR)
    _assert_close(tv, ref)
    assert tv.metadata["num_batches"] == 3


def test_gradient_accumulation_equals_one_big_batch(zoo, tmp_path, texts):
    base = zoo["llama_base"]
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    one = TaskVector.from_gradient(base, data, lr=LR, micro_batch_size=len(texts), device="cpu")
    acc = TaskVector.from_gradient(base, data, lr=LR, micro_batch_size=1, device="cpu")
    for name in one.keys():
        assert _rel(acc.store.get(name), one.store.get(name)) < 1e-5, name


def test_prompt_completion_scores_only_completion(zoo, tmp_path):
    from transformers import AutoTokenizer

    base = zoo["llama_base"]
    rows = [{"prompt": f"sum: {a} + {b} =", "completion": f" {a + b}"} for a, b in [(1, 2), (30, 4), (12, 12)]]
    data = write_jsonl(tmp_path / "pc.jsonl", rows)
    tv = TaskVector.from_gradient(base, data, lr=LR, device="cpu")
    tok = AutoTokenizer.from_pretrained(base)
    # The reference tokenises the prompt and the completion separately, as documented.
    full = [r["prompt"] + r["completion"] for r in rows]
    assert all(tok(r["prompt"])["input_ids"] + tok(r["completion"], add_special_tokens=False)["input_ids"]
               == tok(f)["input_ids"] for r, f in zip(rows, full)), "pick texts whose tokenisation splits cleanly"
    prompt_lens = {f: len(tok(r["prompt"])["input_ids"]) for r, f in zip(rows, full)}
    _assert_close(tv, _sgd_reference(base, [full], LR, prompt_lens))


def test_include_exclude_patterns(zoo, tmp_path, texts):
    base = zoo["llama_base"]
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    tv = TaskVector.from_gradient(base, data, lr=LR, include=[r"self_attn\.(q|v)_proj"], exclude=[r"layers\.1\."],
                                  device="cpu")
    assert sorted(tv.keys()) == ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"]
    ref = _sgd_reference(base, [texts], LR)
    for name in tv.keys():  # restricting parameters does not change their gradient
        assert _rel(tv.store.get(name), ref[name]) < 1e-5
    with pytest.raises(TaskArithError, match="no parameter matches"):
        TaskVector.from_gradient(base, data, lr=LR, include=["nothing_like_this"], device="cpu")


def test_gradient_vector_merges_saves_and_round_trips(zoo, tmp_path, texts):
    from safetensors.torch import load_file

    base = zoo["llama_base"]
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    tv = TaskVector.from_gradient(base, data, lr=LR, device="cpu", save_dir=tmp_path / "tau")
    assert (tmp_path / "tau" / "task_vector.json").is_file()
    again = StoredTaskVector.load(tmp_path / "tau")
    assert again.metadata["lr"] == LR and again.metadata["kind"] == "gradient"
    # A normal leaf: base + 0.5·τ_grad + 0.3·τ_finetune, streamed to disk.
    ft = TaskVector.from_models(base, zoo["llama_ft_a"])
    out = (0.5 * tv + 0.3 * ft).apply_to(base).save_pretrained(tmp_path / "merged", dtype="float32", progress=False)
    got = load_file(out / "model.safetensors")
    b, f = load_file(Path(base) / "model.safetensors"), load_file(Path(zoo["llama_ft_a"]) / "model.safetensors")
    tau = load_file(tmp_path / "tau" / "task_vector.safetensors")
    for name in b:
        want = b[name].double() + 0.5 * tau.get(name, torch.zeros_like(b[name])).double() + 0.3 * (f[name].double() - b[name].double())
        assert torch.allclose(got[name].double(), want, atol=1e-6), name


def test_cli_gradient_output_is_usable_by_apply(zoo, tmp_path, texts):
    from safetensors.torch import load_file

    base = zoo["llama_base"]
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    out = tmp_path / "grad_model"
    assert cli_main(["-q", "gradient", "--base", str(base), "--data", str(data), "--lr", str(LR), "--out", str(out),
                     "--device", "cpu"]) == 0
    meta = json.loads((out / "gradient_task_vector.json").read_text())
    assert meta["lr"] == LR and meta["form"] == "full_batch_mean"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "grad_model"]  # scratch τ folder removed
    desc = (out / "hf_taskarith.json").read_text() + (out / "README.md").read_text()
    assert "gradient of d.jsonl" in desc and str(tmp_path) not in desc  # no local path published
    merged = tmp_path / "applied"
    assert cli_main(["-q", "apply", "--base", str(base), "--task", f"{out}:0.5", "--out", str(merged),
                     "--dtype", "float32"]) == 0
    ref = _sgd_reference(base, [texts], LR)
    b, got = load_file(Path(base) / "model.safetensors"), load_file(merged / "model.safetensors")
    for name, tau in ref.items():  # θ0 + 0.5·τ, through the θ0+τ folder (fp32 rounding of θ0+τ allowed)
        assert torch.allclose(got[name].double(), b[name].double() + 0.5 * tau, atol=1e-6), name
    vec = tmp_path / "grad_vec"
    assert cli_main(["-q", "gradient", "--base", str(base), "--data", str(data), "--lr", str(LR), "--out", str(vec),
                     "--format", "vector", "--device", "cpu", "--include", "mlp"]) == 0
    assert all("mlp" in k for k in StoredTaskVector.load(vec).keys())
    applied_vec = tmp_path / "applied_vec"  # a stored τ folder is a --task input too
    assert cli_main(["-q", "apply", "--base", str(base), "--task", f"{vec}:0.5", "--out", str(applied_vec),
                     "--dtype", "float32"]) == 0
    got = load_file(applied_vec / "model.safetensors")
    for name, tensor in b.items():
        want = b[name].double() + 0.5 * ref[name] if "mlp" in name else tensor.double()
        assert torch.allclose(got[name].double(), want, atol=1e-6), name


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": oops}\n', r"d\.jsonl:2: invalid JSON"),
    ('{"text": "ok"}\n\n[1, 2]\n', r"d\.jsonl:3: expected a JSON object"),
    ('{"txt": "typo"}\n', r"d\.jsonl:1: missing field 'text'"),
    ('{"prompt": "only a prompt"}\n', r"d\.jsonl:1: field 'completion' is missing"),
    ('{"text": 5}\n', r"d\.jsonl:1: field 'text' must be a string"),
    ("\n\n", r"d\.jsonl: no examples"),
])
def test_bad_jsonl_is_named(zoo, tmp_path, content, message):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(DatasetError, match=message):
        TaskVector.from_gradient(zoo["llama_base"], tmp_path / "d.jsonl", lr=LR, device="cpu")


def test_cli_errors_are_one_line(zoo, tmp_path, capsys):
    assert cli_main(["gradient", "--base", str(zoo["llama_base"]), "--data", str(tmp_path / "missing.jsonl"),
                     "--lr", "0.1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.jsonl: data file not found" in err and "\n" not in err
    empty_completion = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "sum: 1 + 1 =", "completion": ""}])
    with pytest.raises(DatasetError, match="no token to score"):
        TaskVector.from_gradient(zoo["llama_base"], empty_completion, lr=LR, device="cpu")


_WORKER = r"""
import sys, torch
from accelerate import PartialState
from hf_taskarith import TaskVector
state = PartialState(cpu=True)
torch.set_num_threads(1)
assert state.num_processes == 2, state.num_processes
base, data, out = sys.argv[1:4]
TaskVector.from_gradient(base, data, lr=%r, micro_batch_size=2, save_dir=out + "/mean")
TaskVector.from_gradient(base, data, lr=%r, batch_size=4, micro_batch_size=1, save_dir=out + "/sum")
from hf_taskarith.cli import main
assert main(["-q", "gradient", "--base", base, "--data", data, "--lr", "%r", "--out", out + "/cli", "--device", "cpu"]) == 0
state.destroy_process_group()
"""


def test_two_processes_equal_one(zoo, tmp_path, texts):
    """Two gloo ranks (torchrun, CPU) share the micro-batches and all-reduce: same τ as one process,
    for the full-batch mean and for the sum over batches."""
    base = zoo["llama_base"]
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    script = tmp_path / "worker.py"
    script.write_text(_WORKER % (LR, LR, LR))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    with socket.socket() as sock:  # a free port (torchrun's --master_port 0 hangs in rendezvous)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(port),
         str(script), str(base), str(data), str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for form, kw in (("mean", {}), ("sum", {"batch_size": 4})):
        two = StoredTaskVector.load(tmp_path / "two" / form)
        one = TaskVector.from_gradient(base, data, lr=LR, micro_batch_size=3, device="cpu", **kw)
        assert set(two.keys()) == set(one.keys())
        for name in one.keys():
            assert _rel(two.store.get(name), one.store.get(name)) < 1e-5, (form, name)
    # The CLI under torchrun: the main rank writes θ0 + τ once (and removes its scratch τ folder).
    from safetensors.torch import load_file

    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["cli", "mean", "sum"]
    theta0, got = load_file(Path(base) / "model.safetensors"), load_file(tmp_path / "two" / "cli" / "model.safetensors")
    mean = StoredTaskVector.load(tmp_path / "two" / "mean")
    for name in mean.keys():
        assert torch.allclose(got[name], theta0[name] + mean.store.get(name), atol=1e-6), name


def test_bf16_autocast_is_close_to_fp32(zoo, tmp_path, texts):
    """bf16 autocast changes the forward arithmetic only: τ stays fp32 and points the same way."""
    base = zoo["llama_base"]
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    fp32 = TaskVector.from_gradient(base, data, lr=LR, device="cpu")
    bf16 = TaskVector.from_gradient(base, data, lr=LR, device="cpu", mixed_precision="bf16")
    a = torch.cat([fp32.store.get(n).reshape(-1) for n in fp32.keys()]).double()
    b = torch.cat([bf16.store.get(n).reshape(-1) for n in fp32.keys()]).double()
    assert bf16.store.get(fp32.keys()[0]).dtype == torch.float32
    assert float(a @ b / (a.norm() * b.norm())) > 0.99 and not torch.equal(a, b)
    with pytest.raises(TaskArithError, match="mixed_precision"):
        TaskVector.from_gradient(base, data, lr=LR, mixed_precision="fp8")


def test_trainer_one_epoch_full_batch_sgd_equals_gradient(zoo, tmp_path, texts):
    """End to end with transformers' Trainer (plain SGD, constant lr, one full batch per epoch, no
    clipping): its checkpoint-1 is θ0 − η∇L(θ0), so from_gradient matches it up to the fp32 rounding of
    θ0 + τ (a few ulp(θ0) per entry), and `trajectory` reads the run folder's checkpoint-N."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from hf_taskarith import analyze_trajectory, find_checkpoints

    base = zoo["llama_base"]
    tok = AutoTokenizer.from_pretrained(base)
    enc = tok(texts, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    rows = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": labels[i]}
            for i in range(len(texts))]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), num_train_epochs=2, per_device_train_batch_size=len(texts),
        learning_rate=LR, lr_scheduler_type="constant", optim="sgd", weight_decay=0.0, max_grad_norm=0.0,
        save_strategy="epoch", report_to=[], use_cpu=True, logging_strategy="no", seed=0,
    )
    Trainer(model=AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), args=args, train_dataset=rows).train()
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    tv = TaskVector.from_gradient(base, data, lr=LR, device="cpu")
    theta0, theta1 = load_file(Path(base) / "model.safetensors"), load_file(tmp_path / "run" / "checkpoint-1" / "model.safetensors")
    for name in tv.keys():
        ulp = torch.finfo(torch.float32).eps * theta0[name].abs().max().clamp_min(1.0)
        assert torch.allclose(theta1[name] - theta0[name], tv.store.get(name), rtol=1e-4, atol=float(4 * ulp)), name
    report = analyze_trajectory(base, find_checkpoints([tmp_path / "run"]))
    assert report.checkpoints == ["checkpoint-1", "checkpoint-2"]
    norm = math.sqrt(sum(float(tv.store.get(n).double().square().sum()) for n in tv.keys()))
    assert report.overall.update_norms()[0] == pytest.approx(norm, rel=1e-4)
