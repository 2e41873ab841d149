"""``device="cuda"``: the GPU path gives the CPU path's numbers (fp32 math on both).

The GPU tests skip cleanly without CUDA; the last test runs everywhere and checks that asking for
CUDA on a machine without it is a clear error that writes nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hf_taskarith import BaseModel, TaskVector
from hf_taskarith.errors import TaskArithError
from hf_taskarith.method_merge import run_recipe
from hf_taskarith.recipe import load_recipe

def _load(folder: Path) -> dict:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _recipe(tmp_path: Path, name: str, **data) -> Path:
    data.setdefault("dtype", "float32")
    data.setdefault("output", {"max_shard_size": "40KB"})  # several shards: read-ahead across files
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _both(tmp_path: Path, recipe: Path):
    cpu = _load(run_recipe(load_recipe(recipe), tmp_path / f"{recipe.stem}-cpu", device="cpu", progress=False))
    gpu = _load(run_recipe(load_recipe(recipe), tmp_path / f"{recipe.stem}-cuda", device="cuda", progress=False))
    return cpu, gpu


def _assert_fp32_close(cpu: dict, gpu: dict) -> None:
    assert cpu.keys() == gpu.keys()
    for k in cpu:
        assert gpu[k].dtype == cpu[k].dtype
        torch.testing.assert_close(gpu[k], cpu[k], rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "method,params,topk_scope",
    [
        ("task_arithmetic", {}, "tensor"),
        ("ties", {"density": 0.4}, "tensor"),
        ("ties", {"density": 0.3}, "global"),
    ],
)
def test_cuda_methods_match_cpu(zoo, tmp_path, method, params, topk_scope):
    # Dense τ are exact fp32 differences on both devices, so top-k picks the same entries
    # (a LoRA τ comes from a matmul whose last bits may differ: see the task-vector test below).
    r = _recipe(
        tmp_path, f"{method}-{topk_scope}", base=str(zoo["llama_base"]), method=method, parameters=params,
        topk_scope=topk_scope,
        tasks=[{"model": str(zoo["llama_ft_a"]), "weight": 0.6}, {"model": str(zoo["llama_ft_b"]), "weight": 0.4},
               {"model": str(zoo["llama_ft_c"]), "weight": 0.3}],
    )
    _assert_fp32_close(*_both(tmp_path, r))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_dare_ties_drops_and_rescales_like_the_formula(zoo, tmp_path):
    """DARE's masks come from a CUDA generator (other bits than the CPU's), so check the formula.

    With one task TIES' sign election keeps every surviving entry, so θ − θ0 = w·m⊙τ/p with m a
    Bernoulli(p) mask: each entry is 0 or w·τ/p, about p of them survive, and the same seed gives
    the same bytes.
    """
    base, ft = _load(zoo["llama_base"]), _load(zoo["llama_ft_a"])
    r = _recipe(tmp_path, "dare", base=str(zoo["llama_base"]), method="dare_ties", seed=5,
                parameters={"density": 0.5, "normalize": False}, tasks=[{"model": str(zoo["llama_ft_a"]), "weight": 0.8}])
    out = run_recipe(load_recipe(r), tmp_path / "a", device="cuda", progress=False)
    again = run_recipe(load_recipe(r), tmp_path / "b", device="cuda", progress=False)
    for f in sorted(out.glob("*.safetensors")):
        assert f.read_bytes() == (again / f.name).read_bytes()
    got = _load(out)
    kept = total = 0
    for k, b in base.items():
        tau = ft[k].float() - b.float()
        delta = got[k] - b.float()
        full = 0.8 * tau / 0.5
        is_kept = torch.isclose(delta, full, rtol=1e-5, atol=1e-7) & (tau != 0)
        is_dropped = delta.abs() <= 1e-7
        assert bool((is_kept | is_dropped).all()), k
        kept += int(is_kept.sum())
        total += int((tau != 0).sum())
    assert 0.45 < kept / total < 0.55


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_task_vector_api_with_lora_matches_cpu(zoo, tmp_path):
    base = BaseModel(zoo["llama_base"])
    merged = base + 0.7 * TaskVector.from_models(base, zoo["llama_ft_a"]) + 0.5 * TaskVector.from_adapter(zoo["lora_plain"])
    cpu = _load(merged.save_pretrained(tmp_path / "cpu", dtype="float32", device="cpu", progress=False))
    gpu = _load(merged.save_pretrained(tmp_path / "cuda", dtype="float32", device="cuda", progress=False))
    _assert_fp32_close(cpu, gpu)
    # bf16 output: the same fp32 math, rounded once at the end on both devices.
    cpu16 = _load(merged.save_pretrained(tmp_path / "cpu16", dtype="bfloat16", device="cpu", progress=False))
    gpu16 = _load(merged.save_pretrained(tmp_path / "cuda16", dtype="bfloat16", device="cuda", progress=False))
    for k in cpu16:
        assert gpu16[k].dtype == torch.bfloat16
        diff = (gpu16[k].float() - cpu16[k].float()).abs()
        ulp = cpu16[k].float().abs() * 2**-7 + 1e-30
        assert bool((diff <= ulp).all()), k  # at most one bf16 step where fp32 rounding straddles


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_iter_tensors_returns_cpu_tensors(zoo):
    base = BaseModel(zoo["llama_base"])
    merged = base + TaskVector.from_models(base, zoo["llama_ft_a"])
    want = _load(zoo["llama_ft_a"])
    for name, tensor in merged.iter_tensors("float32", device="cuda"):
        assert tensor.device.type == "cpu"
        torch.testing.assert_close(tensor, want[name].float(), rtol=0, atol=0)  # base + 1.0·τ is the finetune


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(zoo, tmp_path):
    base = BaseModel(zoo["llama_base"])
    merged = base + TaskVector.from_models(base, zoo["llama_ft_a"])
    with pytest.raises(TaskArithError, match="CUDA"):
        merged.save_pretrained(tmp_path / "out", device="cuda", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
