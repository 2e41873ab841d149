"""The streaming engine's bounds: tensors in flight, the background writer, per-rank shard writing."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import pytest
import torch

from hf_taskarith import BaseModel, TaskVector
from hf_taskarith.engine import add_scaled_, scale_into_
from hf_taskarith.errors import TaskArithError
from hf_taskarith.writer import BackgroundWriter, PlannedTensor, ShardPlan, StreamingShardWriter, write_index


def test_read_ahead_bounds_the_tensors_in_flight(zoo):
    base = BaseModel(zoo["llama_base"])
    merged = base + 0.5 * TaskVector.from_models(base, zoo["llama_ft_a"])
    lock = threading.Lock()
    state = {"started": 0, "taken": 0, "most_ahead": 0}
    real = type(merged).compute

    def compute(self, name, lazy):
        with lock:
            state["started"] += 1
            state["most_ahead"] = max(state["most_ahead"], state["started"] - state["taken"])
        return real(self, name, lazy)

    merged.compute = compute.__get__(merged)
    for _ in merged.iter_tensors(read_ahead=2):
        time.sleep(0.01)  # a slow consumer: workers would run ahead if nothing bounded them
        with lock:
            state["taken"] += 1
    assert state["taken"] > 6
    assert state["most_ahead"] <= 3  # read_ahead + the one being handed over


def test_bytes_in_flight_stay_within_the_largest_tensor_and_a_quarter(zoo, tmp_path, monkeypatch):
    """Two big tensors (embeddings, lm_head) are never in flight together, the writer's included."""
    from hf_taskarith import engine
    from hf_taskarith.writer import StreamingShardWriter as Writer

    base = BaseModel(zoo["llama_base"])
    merged = base + 0.5 * TaskVector.from_models(base, zoo["llama_ft_a"])
    store = base.store
    size = {n: math.prod(store.shape(n)) * 4 for n in store.keys()}  # fp32 output bytes
    budget = max(size.values()) * 5 // 4
    writers = []

    class Recording(engine.BackgroundWriter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            writers.append(self)

    monkeypatch.setattr(engine, "BackgroundWriter", Recording)
    slow_write = Writer.write
    monkeypatch.setattr(Writer, "write", lambda self, *a: (time.sleep(0.01), slow_write(self, *a))[1])
    lock = threading.Lock()
    active = {}
    seen = {"worst": 0, "starts": 0}
    real = type(merged).compute

    def compute(self, name, lazy):
        with lock:
            busy = sum(active.values()) + writers[0].held_bytes()
            if busy:  # something else in flight: this one must fit beside it
                seen["worst"] = max(seen["worst"], busy + size[name])
            active[name] = size[name]
            seen["starts"] += 1
        try:
            time.sleep(0.005)
            return real(self, name, lazy)
        finally:
            with lock:
                del active[name]

    merged.compute = compute.__get__(merged)
    merged.save_pretrained(tmp_path / "out", dtype="float32", progress=False)
    assert seen["starts"] == len([n for n in store.keys() if store.dtype(n).is_floating_point])
    assert 0 < seen["worst"] <= budget
    big = sorted(size, key=size.get)[-2:]
    assert sum(size[n] for n in big) > budget  # so the two biggest never overlapped


def _plan():
    tensors = [PlannedTensor(f"t{i}", (4, 3), torch.float32) for i in range(5)]
    return ShardPlan.build(tensors, 2 * 4 * 3 * 4)  # two tensors a shard: 3 shards


def test_shard_subsets_write_the_same_files_as_one_writer(tmp_path):
    plan = _plan()
    values = {t.name: torch.arange(12, dtype=torch.float32).reshape(4, 3) + i for i, t in enumerate(plan.order())}
    whole = tmp_path / "whole"
    whole.mkdir()
    w = StreamingShardWriter(whole, plan)
    for t in plan.order():
        w.write(t.name, values[t.name])
    w.close()
    split = tmp_path / "split"
    split.mkdir()
    for shards in ([0, 2], [1]):
        w = StreamingShardWriter(split, plan, shards=shards)
        for t in w.order():
            w.write(t.name, values[t.name])
        w.close()
    assert not (split / "model.safetensors.index.json").exists()  # the index is rank 0's job
    write_index(split, plan)
    assert sorted(p.name for p in whole.iterdir()) == sorted(p.name for p in split.iterdir())
    for p in whole.iterdir():
        assert p.read_bytes() == (split / p.name).read_bytes(), p.name


def test_background_writer_raises_the_threads_error(tmp_path):
    plan = _plan()
    bw = BackgroundWriter(StreamingShardWriter(tmp_path, plan), max_queued=1)
    bw.put("t0", torch.zeros(4, 3))
    bw.put("wrong", torch.zeros(4, 3))  # out of plan order: the thread fails
    with pytest.raises(TaskArithError, match="expected 't1'"):
        for _ in range(10):  # a later put or close reports it
            bw.put("t2", torch.zeros(4, 3))
        bw.close()
    bw.abort()


def test_blockwise_accumulate_is_bit_identical_to_one_op():
    g = torch.Generator().manual_seed(0)
    acc = torch.randn(3, (1 << 22) // 3 + 5, generator=g)  # not a whole number of blocks
    x = torch.randn(acc.shape, generator=g).to(torch.bfloat16)
    want = acc.clone().add_(x, alpha=0.37)
    assert torch.equal(add_scaled_(acc.clone(), x, 0.37), want)
    want = x.float() * -1.3  # in fp32 (torch.mul(x, -1.3, out=fp32) would round to bf16 first)
    assert torch.equal(scale_into_(torch.empty_like(acc), x, -1.3), want)


def test_task_arithmetic_recipe_folds_to_the_formula(zoo, tmp_path):
    """Recipes' task_arithmetic streams like ``apply`` (no τ stack): check it against the formula."""
    import yaml
    from safetensors.torch import load_file

    from hf_taskarith.method_merge import run_recipe
    from hf_taskarith.recipe import load_recipe

    r = tmp_path / "ta.yaml"
    r.write_text(yaml.safe_dump({
        "base": str(zoo["llama_base"]), "method": "task_arithmetic", "dtype": "float32",
        "parameters": {"lambda": 0.8, "normalize": True},
        "tasks": [{"model": str(zoo["llama_ft_a"]), "weight": 0.5}, {"model": str(zoo["llama_ft_b"]), "weight": -0.3},
                  {"adapter": str(zoo["lora_b"]), "weight": 0.4}],
    }))
    got = load_file(run_recipe(load_recipe(r), tmp_path / "out", progress=False) / "model.safetensors")
    from test_task_vectors import peft_merged_state

    base, fa, fb = (load_file(Path(zoo[m]) / "model.safetensors") for m in ("llama_base", "llama_ft_a", "llama_ft_b"))
    lora = peft_merged_state(zoo["llama_base"], zoo["lora_b"])  # θ0 + τ_lora from PEFT's own merge
    c = [0.8 * w / 0.6 for w in (0.5, -0.3, 0.4)]
    for k, b in base.items():
        b = b.float()
        want = b + c[0] * (fa[k].float() - b) + c[1] * (fb[k].float() - b) + c[2] * (lora[k].float() - b)
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6, msg=k)
