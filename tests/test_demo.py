"""The demo end to end (``make demo``): the task-arithmetic claims it prints, with margins, and its cache.

The demo builds its models from scratch (a few minutes on two cores), so one module-scoped run
serves every test; ``HF_TASKARITH_DEMO_CACHE=/some/dir`` reuses a folder across test sessions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from hf_taskarith.demo import DemoConfig, run_demo
from hf_taskarith.demo.pipeline import CONTROL, TASK_A, TASK_B, UNWANTED
from hf_taskarith.evaluation import SHIPPED_TASKS_DIR

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    cache = os.environ.get("HF_TASKARITH_DEMO_CACHE")
    out = Path(cache) if cache else tmp_path_factory.mktemp("demo")
    results = run_demo(out, progress=False)
    return out, results


def rows(results):
    return {r["key"]: r["scores"] for r in results["rows"]}


def test_results_json_is_what_run_demo_returned(demo):
    out, results = demo
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(results["rows"]))
    assert (out / "table.md").read_text().strip() == results["table"].strip()


def test_addition_keeps_both_tasks(demo):
    """The A+B merge (λ chosen on validation) reaches ≥ 0.8 of each finetune's TEST accuracy."""
    _, results = demo
    s = rows(results)
    for task, finetune in ((TASK_A, "count_down"), (TASK_B, "letters")):
        assert s[finetune][task] > s["base"][task] + 0.2, (task, "the finetune must learn its task")
        assert s["ta"][task] / s[finetune][task] >= 0.8, (task, s["ta"][task], s[finetune][task])


def test_negation_removes_the_unwanted_behaviour_and_keeps_the_control(demo):
    _, results = demo
    s = rows(results)
    base, ft, neg = s["base"][UNWANTED], s["letters_down"][UNWANTED], s["negation"][UNWANTED]
    assert ft > base, "the unwanted finetune must strengthen the behaviour"
    assert base - neg >= 0.5 * (ft - base), (base, ft, neg)
    assert s["negation"][CONTROL] >= 0.95 * s["base"][CONTROL]


def _mc_accuracy(folder: Path, task: str) -> float:
    """Accuracy by argmax of the next-token logits over the choices: a second implementation of
    lm-eval's multiple-choice scoring (every choice is one word of the demo tokenizer)."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    name = task.removeprefix("taskarith_")
    docs = [json.loads(line) for line in (SHIPPED_TASKS_DIR / "data" / f"{name}_test.jsonl").read_text().splitlines()]
    hits = 0
    for d in docs:
        ids = tok(d["prompt"], return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
        choice_ids = [tok.convert_tokens_to_ids(c) for c in d["choices"]]
        hits += int(torch.argmax(logits[choice_ids]).item() == d["label"])
    return hits / len(docs)


def test_table_numbers_match_an_independent_scorer(demo):
    _, results = demo
    s = rows(results)
    folders = {"ta": results["outputs"]["merges"]["ta"], "negation": results["outputs"]["merges"]["negation"],
               "count_down": results["outputs"]["models"]["count_down"]}
    for key, folder in folders.items():
        for task in (CONTROL, TASK_A, TASK_B, UNWANTED):
            assert _mc_accuracy(Path(folder), task) == pytest.approx(s[key][task], abs=1e-9), (key, task)


def test_outputs_recipes_cards_and_plots(demo):
    from hf_taskarith.recipe import load_recipe

    out, results = demo
    ta = load_recipe(out / "recipes" / "ta.yaml")
    assert ta.parameters["lambda"] == pytest.approx(results["searches"]["ta"]["chosen"]["lambda"])
    assert load_recipe(out / "recipes" / "adapter.yaml").output.format == "adapter"
    assert (Path(results["outputs"]["merges"]["adapter"]) / "adapter_config.json").is_file()
    card = (Path(results["outputs"]["merges"]["ta"]) / "README.md").read_text()
    assert "## Evaluation" in card and "model-index" in card and TASK_A in card
    for png in results["outputs"]["plots"].values():
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every merge was tuned on validation splits only
    for name, search in results["searches"].items():
        saved = json.loads((out / "search" / name / "search_results.json").read_text())
        assert saved["chosen"] == search["chosen"]
    e = results["epoch1_vs_converged"]
    assert set(e["epoch1"]["normalized_vs_converged_finetunes"]) == {TASK_A, TASK_B}


def test_second_run_reuses_every_cached_artifact(demo, monkeypatch):
    """A second run trains, searches and evaluates nothing, and reports the same numbers."""
    import hf_taskarith.demo.build as build
    import hf_taskarith.evaluation as evaluation
    import hf_taskarith.search as search

    def boom(*a, **k):
        raise AssertionError("the second run recomputed something it had cached")

    for mod, name in ((build, "pretrain"), (build, "finetune"), (search, "search"), (evaluation, "evaluate")):
        monkeypatch.setattr(mod, name, boom)
    out, first = demo
    again = run_demo(out, progress=False)
    assert again["rows"] == first["rows"] and again["claims"] == first["claims"]


def test_push_to_hub_sends_the_ta_merge(demo, tmp_path):
    pytest.importorskip("hub_server")
    from hub_server import HubServer, patch_hub_env

    server = HubServer().start()
    mp = pytest.MonkeyPatch()
    try:
        patch_hub_env(server, mp, tmp_path / "hf_home")
        out, _ = demo
        results = run_demo(out, progress=False, push_to_hub="alice/demo-merge")
        assert "alice/demo-merge" in results["outputs"]["pushed"]
        files = server.files("alice/demo-merge")
        assert "README.md" in files and "model.safetensors" in files
    finally:
        mp.undo()
        server.stop()


def test_config_hash_changes_with_the_setup():
    from hf_taskarith.demo.pipeline import cache_key

    assert cache_key(DemoConfig()) == cache_key(DemoConfig())
    assert cache_key(DemoConfig()) != cache_key(DemoConfig(pretrain_steps=601))
