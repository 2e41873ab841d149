"""In-memory coefficient search: exact apply/revert, the two selection rules, recipes, plumbing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from hf_taskarith import BaseModel, TaskVector
from hf_taskarith.errors import TaskArithError
from hf_taskarith.method_merge import build_merge
from hf_taskarith.recipe import load_recipe
from hf_taskarith.search import InPlaceDelta, MergeSpace, apply_scaled, parse_grid, search, write_recipe

REF = "model.layers.0.mlp.down_proj.weight"  # changed by every dense finetune of the zoo


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load(folder, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bitwise(model, snap):
    state = model.state_dict()
    assert state.keys() == snap.keys()
    for k, v in snap.items():
        assert torch.equal(state[k], v), k


def rel(path: Path, start: Path) -> str:
    r = os.path.relpath(path, start)
    return r if r.startswith("../") else "./" + r


# ------------------------------------------------------------------------------ apply / revert
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_revert_is_bitwise_after_many_lambdas(zoo, dtype):
    base = BaseModel(zoo["llama_base"])
    expr = TaskVector.from_models(base, zoo["llama_ft_a"]) - 0.5 * TaskVector.from_adapter(zoo["lora_plain"])
    model = load(zoo["llama_base"], dtype)
    snap = snapshot(model)
    patch = InPlaceDelta(model, expr, base=base, per_task=True)
    patch.apply(0.1)
    at_01 = snapshot(model)  # θ0 + 0.1·δ applied to the clean base
    patch.revert()
    for coefs in (0.3, 1.0, -0.7, [0.25, 1.5], 0.05, [1.0, 0.0]):
        patch.apply(coefs)
        assert not torch.equal(model.state_dict()[REF], snap[REF])
        patch.apply(0.1)  # point to point without a revert: computed from θ0, never stacked
        assert_bitwise(model, at_01)
        patch.apply(coefs)
        patch.revert()
        assert_bitwise(model, snap)
    # The copy of the originals is in the model dtype: no more than the touched weights.
    touched = sum(snap[n].numel() * snap[n].element_size() for n in patch.space.names if n in snap)
    assert patch.backup.saved_bytes() <= touched


def test_reload_restore_and_uncached_deltas_are_exact_too(zoo):
    base = BaseModel(zoo["llama_base"])
    tv = TaskVector.from_models(base, zoo["llama_ft_b"])
    model = load(zoo["llama_base"], torch.bfloat16)  # fp32 checkpoint, bf16 weights
    snap = snapshot(model)
    patch = InPlaceDelta(model, tv, base=base, restore="reload", cache=False)
    for lam in (0.4, 1.0, -1.0):
        with patch.applied_at(lam):
            assert not torch.equal(model.state_dict()[REF], snap[REF])
        assert_bitwise(model, snap)
    assert patch.backup.saved_bytes() == 0  # nothing copied: originals re-read from the checkpoint
    assert patch.space.components[0].cached_bytes() == 0


def test_an_error_inside_the_block_still_reverts(zoo):
    base = BaseModel(zoo["llama_base"])
    model = load(zoo["llama_base"])
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with apply_scaled(model, TaskVector.from_models(base, zoo["llama_ft_a"]), 0.8, base=base):
            raise RuntimeError("boom")
    assert_bitwise(model, snap)


def test_applied_values_match_the_streaming_merge(zoo, tmp_path):
    base = BaseModel(zoo["llama_base"])
    tv = 0.6 * TaskVector.from_models(base, zoo["llama_ft_a"]) + 0.3 * TaskVector.from_adapter(zoo["lora_b"])
    model = load(zoo["llama_base"])
    want = tv.apply_to(base, scaling_coef=0.5).to_model(torch.float32).state_dict()
    with apply_scaled(model, tv, 0.5, base=base):
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, want[k], rtol=0, atol=1e-6)
    # a method merge: λ replaces the recipe's lambda (here TIES)
    data = dict(base=str(zoo["llama_base"]), method="ties", parameters={"density": 0.5, "lambda": 0.2},
                tasks=[{"model": str(zoo["llama_ft_a"])}, {"model": str(zoo["llama_ft_b"])}], dtype="float32")
    r = tmp_path / "ties.yaml"
    r.write_text(yaml.safe_dump(data))
    data["parameters"]["lambda"] = 0.7
    want = build_merge(load_recipe(data)).to_model(torch.float32).state_dict()
    with apply_scaled(model, r, 0.7):
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, want[k], rtol=0, atol=1e-6)


def test_tied_weights_are_changed_once(zoo):
    base = BaseModel(zoo["gpt2_base"])
    model = load(zoo["gpt2_base"])
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    snap = snapshot(model)
    want = load(zoo["gpt2_ft_a"]).state_dict()
    with apply_scaled(model, TaskVector.from_models(base, zoo["gpt2_ft_a"]), 1.0, base=base):
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, want[k], rtol=0, atol=1e-6)
    assert_bitwise(model, snap)


def test_bad_inputs_are_refused(zoo):
    base = BaseModel(zoo["llama_base"])
    tv = TaskVector.from_models(base, zoo["llama_ft_a"])
    with pytest.raises(TaskArithError, match="base="):
        MergeSpace.build(tv)
    with pytest.raises(TaskArithError, match="counterpart|shape"):
        InPlaceDelta(load(zoo["gpt2_base"]), tv, base=base)
    with pytest.raises(TaskArithError, match="coefficient"):
        InPlaceDelta(load(zoo["llama_base"]), tv, base=base).apply([0.1, 0.2])
    with pytest.raises(TaskArithError, match="nothing to search|lambda/alpha"):
        MergeSpace.build(load_recipe(dict(base=str(zoo["llama_base"]), method="model_stock",
                                          tasks=[{"model": str(zoo["llama_ft_a"])}, {"model": str(zoo["llama_ft_b"])}])))
    with pytest.raises(TaskArithError, match="per-task"):
        MergeSpace.build(load_recipe(dict(base=str(zoo["llama_base"]), method="ties", tasks=[{"model": str(zoo["llama_ft_a"])}])),
                         per_task=True)


def test_parse_grid():
    g = parse_grid("0:1:0.05")
    assert len(g) == 21 and g[0] == 0.0 and g[-1] == 1.0 and g[7] == 0.35
    assert parse_grid("1, 0.5,0") == [0.0, 0.5, 1.0]
    assert parse_grid([0.2, 0.1]) == [0.1, 0.2]
    for bad in ("0:1", "a,b", "1:0:0.1", "0:1:0", ""):
        with pytest.raises(TaskArithError):
            parse_grid(bad)


# ------------------------------------------------------------------------------ rules, constructed case
class KnownCurves:
    """An evaluation with a known accuracy curve: reads back the coefficients applied to the weights.

    The current model weights are θ0 + Σ c_i δ_i; c is recovered by least squares on one tensor,
    so the search, the in-place application and the finetune evaluation are all exercised for real.
    """

    def __init__(self, space: MergeSpace, model, curves):
        self.p0 = model.state_dict()[REF].detach().double().flatten().clone()
        self.dirs = torch.stack([c.get(REF).double().flatten() for c in space.components], dim=1)
        self.curves = curves
        self.calls = []

    def coefs(self, model):
        diff = model.state_dict()[REF].detach().double().flatten() - self.p0
        return torch.linalg.lstsq(self.dirs, diff.unsqueeze(1)).solution.flatten().tolist()

    def __call__(self, model, tasks):
        c = self.coefs(model)
        self.calls.append((list(tasks), [round(x, 4) for x in c]))
        return {t: self.curves[t](*c) for t in tasks}


def two_task_space(zoo, per_task=True):
    base = BaseModel(zoo["llama_base"])
    expr = TaskVector.from_models(base, zoo["llama_ft_a"]) + TaskVector.from_models(base, zoo["llama_ft_b"])
    return MergeSpace.build(expr, base=base, per_task=per_task)


def test_addition_rule_finds_the_known_lambda(zoo):
    space = two_task_space(zoo)
    model = load(zoo["llama_base"])
    curves = {
        "task_a": lambda a, b: 1 - (a - 0.4) ** 2 - 0.5 * b**2,
        "task_b": lambda a, b: 1 - (b - 0.4) ** 2 - 0.5 * a**2,
    }
    fake = KnownCurves(space, model, curves)
    result = search(space, ["task_a", "task_b"], rule="addition", model=model, evaluate_fn=fake,
                    task_map={"task_a": 0, "task_b": "llama_ft_b"})
    # Finetunes evaluated in memory as θ0 + τ_i: (1, 0) and (0, 1).
    assert result.finetune_scores["task_a"] == pytest.approx(0.64, abs=1e-4)
    assert result.finetune_scores["task_b"] == pytest.approx(0.64, abs=1e-4)
    # mean normalised accuracy on the grid: (1 − (λ−0.4)² − λ²/2)/0.64, maximal at 0.8/3 → grid 0.25
    assert result.chosen == {"lambda": 0.25}
    assert len([p for p in result.points if p["phase"] == "lambda"]) == 21
    best = result.best
    assert best["mean_normalized"] == pytest.approx((1 - 0.15**2 - 0.5 * 0.25**2) / 0.64, abs=1e-4)
    assert best["normalized"]["task_a"] == pytest.approx(best["scores"]["task_a"] / result.finetune_scores["task_a"])


def test_coordinate_search_finds_the_grid_optimum_of_separable_curves(zoo):
    space = two_task_space(zoo)
    model = load(zoo["llama_base"])
    curves = {
        "task_a": lambda a, b: 0.9 - (a - 0.6) ** 2 - 0.1 * b**2,
        "task_b": lambda a, b: 0.9 - (b - 0.2) ** 2 - 0.1 * a**2,
    }
    fake = KnownCurves(space, model, curves)
    grid = parse_grid("0:1:0.1")
    result = search(space, ["task_a", "task_b"], model=model, evaluate_fn=fake, grid=grid, coordinate=True,
                    finetuned_scores={"task_a": 0.8, "task_b": 0.8})

    def objective(a, b):
        return (curves["task_a"](a, b) / 0.8 + curves["task_b"](a, b) / 0.8) / 2

    want = max(((a, b) for a in grid for b in grid), key=lambda ab: objective(*ab))
    assert want == (0.5, 0.2)  # the optimum of the grid (0.6 is pulled down by −0.1a² of the other task)
    assert result.chosen["lambda"] == 1.0
    assert result.chosen["weights"] == pytest.approx(list(want))
    lam_best = max((p for p in result.points if p["phase"] == "lambda"), key=lambda p: p["objective"])
    assert result.best["objective"] > lam_best["objective"]
    assert not any(tasks == ["task_a"] for tasks, _ in fake.calls)  # finetune scores were given: not evaluated


def test_negation_rule_respects_the_control_threshold(zoo):
    base = BaseModel(zoo["llama_base"])
    space = MergeSpace.build(-TaskVector.from_models(base, zoo["llama_ft_a"]), base=base)
    model = load(zoo["llama_base"])
    # the one component is −τ, so the recovered coefficient is λ: target falls with λ, control with λ²
    curves = {"target": lambda lam: 0.9 - 0.8 * lam, "control": lambda lam: 0.8 - 0.4 * lam**2}
    fake = KnownCurves(space, model, curves)
    result = search(space, ["target"], rule="negation", control_tasks=["control"], model=model, evaluate_fn=fake)
    # control ≥ 0.95 × 0.8 = 0.76 ⇔ λ ≤ √0.1 ≈ 0.316: the largest feasible grid λ, 0.3, has the lowest target
    assert result.chosen == {"lambda": 0.3}
    assert result.best["feasible"] and result.best["control_bound"] == pytest.approx(0.76)
    infeasible = [p for p in result.points if not p["feasible"]]
    assert infeasible and min(p["lambda"] for p in infeasible) == 0.35
    assert result.base_scores == {"target": pytest.approx(0.9), "control": pytest.approx(0.8)}
    # a stricter threshold moves the choice down
    strict = search(space, ["target"], rule="negation", control_tasks=["control"], threshold=0.99, model=model,
                    evaluate_fn=KnownCurves(space, model, curves))
    assert strict.chosen == {"lambda": 0.1}  # 0.8 − 0.4λ² ≥ 0.792 ⇔ λ ≤ 0.141


def test_search_inputs_are_checked(zoo):
    space = two_task_space(zoo, per_task=False)
    model = load(zoo["llama_base"])
    fake = lambda m, tasks: {t: 0.5 for t in tasks}  # noqa: E731
    with pytest.raises(TaskArithError, match="control"):
        search(space, ["a"], rule="negation", model=model, evaluate_fn=fake)
    with pytest.raises(TaskArithError, match="rule"):
        search(space, ["a"], rule="nope", model=model, evaluate_fn=fake)
    with pytest.raises(TaskArithError, match="which finetune"):
        search(space, ["a", "b", "c"], model=model, evaluate_fn=fake)
    with pytest.raises(TaskArithError, match="no score"):
        search(space, ["a"], model=model, evaluate_fn=lambda m, t: {}, finetuned_scores={"a": 1.0})


# ------------------------------------------------------------------------------ end to end, real lm-eval
def test_real_search_on_the_zoo_with_offline_tasks(zoo, tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    recipe = folder / "ta.yaml"
    recipe.write_text(yaml.safe_dump({
        "base": rel(zoo["llama_base"], folder), "method": "task_arithmetic", "parameters": {"lambda": 1.0},
        "tasks": [{"model": rel(zoo["llama_ft_a"], folder)}, {"model": rel(zoo["llama_ft_b"], folder)}],
    }))
    model = load(zoo["llama_base"])
    snap = snapshot(model)
    result = search(recipe, "taskarith_count_up,taskarith_letters", grid="0,0.5,1", limit=4, model=model,
                    task_map={"taskarith_count_up": 0, "taskarith_letters": 1}, batch_size=4)
    assert_bitwise(model, snap)  # the caller's model is handed back untouched
    assert [p["lambda"] for p in result.points] == [0.0, 0.5, 1.0]
    assert set(result.finetune_scores) == {"taskarith_count_up", "taskarith_letters"}
    assert result.metrics == {"taskarith_count_up": "acc,none", "taskarith_letters": "acc,none"}
    top = max(p["objective"] for p in result.points)
    assert result.best["objective"] == top and result.chosen["lambda"] in (0.0, 0.5, 1.0)
    assert result.points[0]["scores"] == result.base_scores
    paths = result.save(tmp_path / "out")
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "taskarith_count_up" in paths["table"].read_text()
    # the recipe, written elsewhere, keeps pointing at the same models
    out = write_recipe(recipe, result, tmp_path / "elsewhere" / "tuned.yaml")
    tuned = load_recipe(out)
    assert tuned.parameters["lambda"] == result.chosen["lambda"]
    assert tuned.base == str(zoo["llama_base"].resolve())
    assert out.read_text().startswith("# written by hf-taskarith search")


def test_write_recipe_with_per_task_weights(zoo, tmp_path):
    src = tmp_path / "r.yaml"
    src.write_text(yaml.safe_dump({
        "base": str(zoo["llama_base"]), "method": "task_arithmetic", "parameters": {"lambda": 0.3, "normalize": True},
        "tasks": [{"model": str(zoo["llama_ft_a"]), "weight": 2.0}, {"model": str(zoo["llama_ft_b"]), "weight": 2.0}],
    }))
    space = MergeSpace.build(src, per_task=True)
    assert space.weights == [0.5, 0.5]  # normalised weights: coefficients are λ·w_i/Σw
    out = write_recipe(src, {"chosen": {"lambda": 1.0, "weights": [0.35, 0.1]}}, tmp_path / "w.yaml")
    tuned = load_recipe(out)
    assert [t.weight for t in tuned.tasks] == [0.35, 0.1]
    assert tuned.parameters["lambda"] == 1.0 and tuned.parameters["normalize"] is False
