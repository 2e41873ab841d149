"""lm-eval evaluation: in memory vs on disk, the shipped offline tasks, tables, model cards, the CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from hf_taskarith import BaseModel, TaskVector
from hf_taskarith.errors import TaskArithError
from hf_taskarith.evaluation import (
    SHIPPED_TASKS_DIR,
    compare,
    evaluate,
    primary_metric,
    results_table,
    task_scores,
    to_card_results,
    write_eval_results,
)

TASKS = ["taskarith_count_up", "taskarith_rev"]  # one multiple-choice, one generate-until


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def merge_and_folder(zoo, tmp_path_factory):
    base = BaseModel(zoo["llama_base"])
    merged = (0.6 * TaskVector.from_models(base, zoo["llama_ft_a"]) + 0.4 * TaskVector.from_adapter(zoo["lora_plain"])).apply_to(base)
    folder = merged.save_pretrained(tmp_path_factory.mktemp("merge") / "merged", progress=False)
    return merged, folder


def run_cli(argv, monkeypatch=None):
    """``hf-taskarith`` main, quiet."""
    from hf_taskarith import cli

    return cli.main(["-q", *argv])


# ------------------------------------------------------------------------------ in memory == on disk
def test_in_memory_merge_scores_like_its_saved_folder(merge_and_folder):
    merged, folder = merge_and_folder
    mem = evaluate(merged, TASKS, limit=6, batch_size=4)
    disk = evaluate(str(folder), ",".join(TASKS), limit=6, batch_size=4)
    assert mem["results"] == disk["results"]
    assert set(mem["results"]) == set(TASKS)
    assert "acc,none" in mem["results"]["taskarith_count_up"]
    assert "exact_match,none" in mem["results"]["taskarith_rev"]
    assert mem["n-samples"]["taskarith_count_up"]["effective"] == 6
    json.dumps(mem, allow_nan=False)  # JSON-safe: numpy numbers, callables and NaN converted
    assert mem["hf_taskarith"]["model"].endswith("(merge, in memory)") and disk["hf_taskarith"]["model"] == "merged"


def test_a_loaded_model_object_and_the_folder_agree(zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(zoo["llama_ft_b"]))
    tok = AutoTokenizer.from_pretrained(str(zoo["llama_ft_b"]))
    a = evaluate(model, ["taskarith_letters"], tokenizer=tok, limit=5)
    b = evaluate(zoo["llama_ft_b"], ["taskarith_letters"], limit=5)
    assert a["results"] == b["results"]
    # a PEFT adapter folder is applied to its base in memory
    base = BaseModel(zoo["llama_base"])
    c = evaluate(zoo["lora_plain"], ["taskarith_letters"], limit=5)
    d = evaluate(TaskVector.from_adapter(zoo["lora_plain"]).apply_to(base), ["taskarith_letters"], limit=5)
    assert c["results"] == d["results"]


def test_shipped_tasks_load_from_any_directory_and_choose_splits(zoo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data_files are relative to the task folder, not to the working directory
    val = evaluate(zoo["llama_base"], ["taskarith_count_down", "taskarith_sum"], split="validation")
    test = evaluate(zoo["llama_base"], ["taskarith_count_down", "taskarith_sum"])
    n = {s: {t: r["n-samples"][t]["effective"] for t in r["n-samples"]} for s, r in (("val", val), ("test", test))}
    assert n == {"val": {"taskarith_count_down": 30, "taskarith_sum": 28},
                 "test": {"taskarith_count_down": 30, "taskarith_sum": 27}}
    assert not list(tmp_path.iterdir())  # nothing written in the working directory
    tagged = evaluate(zoo["llama_base"], "taskarith_mc", split="validation", limit=2)
    assert set(tagged["results"]) == {"taskarith_count_up", "taskarith_count_down", "taskarith_sum", "taskarith_letters"}
    with pytest.raises(TaskArithError, match="no train split"):
        evaluate(zoo["llama_base"], ["taskarith_sum"], split="train")
    # a tag expands to the family; the whole data set is in the vocabulary of the tiny tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(zoo["tokenizer"]))
    for f in (SHIPPED_TASKS_DIR / "data").glob("*.jsonl"):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            ids = tok(row["prompt"] + " " + row["answer"]).input_ids
            assert tok.unk_token_id not in ids, (f.name, row)


def test_lm_eval_itself_runs_the_shipped_tasks(zoo, tmp_path, monkeypatch):
    """Plain lm-eval (no hf_taskarith code path) with --include_path, from another directory."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(tmp_path)
    tm = TaskManager(include_path=str(SHIPPED_TASKS_DIR), include_defaults=False)
    assert {"taskarith_count_up", "taskarith_count_down", "taskarith_sum", "taskarith_letters", "taskarith_rev",
            "taskarith", "taskarith_mc"} <= set(tm.all_tasks)
    lm = HFLM(pretrained=str(zoo["llama_base"]), device="cpu", batch_size=4)
    res = lm_eval.simple_evaluate(model=lm, tasks=["taskarith_rev"], task_manager=tm, limit=3, bootstrap_iters=0)
    assert res["results"]["taskarith_rev"]["exact_match,none"] == 0.0  # a random base does not reverse


def test_unknown_task_and_bad_include_path(zoo, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    import hf_taskarith.evaluation as ev

    with pytest.raises(TaskArithError, match="include path"):
        evaluate(zoo["llama_base"], ["taskarith_sum"], include_path=tmp_path / "missing")
    # Only local task names: lm-eval's built-in index (~17 s) is never built.
    tm = ev.get_task_manager(["taskarith_sum"], None)
    assert "taskarith_sum" in tm.all_tasks and "hellaswag" not in tm.all_tasks
    # An unknown name falls back to the full index (stood in for by the local one here), then fails.
    key = ((str(SHIPPED_TASKS_DIR),), True)
    monkeypatch.setitem(ev._TASK_MANAGERS, key, TaskManager(include_path=str(SHIPPED_TASKS_DIR), include_defaults=False))
    with pytest.raises(TaskArithError, match="unknown lm-eval task.*no_such_task"):
        evaluate(zoo["llama_base"], ["taskarith_sum", "no_such_task"], include_path=SHIPPED_TASKS_DIR)


# ------------------------------------------------------------------------------ tables and cards
def fake_results():
    import numpy as np

    return {
        "results": {
            "taskarith_sum": {"name": "taskarith_sum", "alias": "taskarith_sum", "sample_len": 4,
                              "acc,none": np.float64(0.75), "acc_stderr,none": np.float32(0.25)},
            "hellaswag": {"alias": "hellaswag", "acc,none": 0.5, "acc_stderr,none": "N/A",
                          "acc_norm,none": 0.625, "acc_norm_stderr,none": 0.01},
        },
        "configs": {"hellaswag": {"dataset_path": "Rowan/hellaswag"}, "taskarith_sum": {"dataset_path": "json"}},
    }


def test_results_table_card_results_and_metrics():
    res = fake_results()
    table = results_table(res).splitlines()
    assert table[0] == "| task | metric | value | stderr |"
    assert "| taskarith_sum | acc | 0.7500 | 0.2500 |" in table
    assert "| hellaswag | acc | 0.5000 | N/A |" in table and "| hellaswag | acc_norm | 0.6250 | 0.0100 |" in table
    card = to_card_results(res)
    assert {"task": "hellaswag", "metric": "acc_norm", "value": 0.625, "dataset": "Rowan/hellaswag",
            "dataset_name": "hellaswag"} in card
    assert {"task": "taskarith_sum", "metric": "acc", "value": 0.75, "dataset": "taskarith_sum",
            "dataset_name": "taskarith_sum"} in card
    assert task_scores(res) == {"taskarith_sum": 0.75, "hellaswag": 0.5}
    assert primary_metric(res["results"]["hellaswag"], "acc_norm") == ("acc_norm,none", 0.625)
    with pytest.raises(TaskArithError, match="f1"):
        primary_metric(res["results"]["hellaswag"], "f1")


def test_write_eval_results_refreshes_the_merge_card(merge_and_folder, tmp_path):
    import shutil

    from huggingface_hub import ModelCard

    _, folder = merge_and_folder
    target = tmp_path / "m"
    shutil.copytree(folder, target)
    before = (target / "README.md").read_text()
    write_eval_results(target, fake_results())
    card = ModelCard.load(target / "README.md")
    metrics = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert metrics[("hellaswag", "acc_norm")] == 0.625 and metrics[("taskarith_sum", "acc")] == 0.75
    text = card.text
    assert "## Evaluation" in text and "| taskarith_sum | acc | 0.7500 |" in text
    assert text.split("## Evaluation")[0].strip() == before.split("---\n", 2)[2].strip()  # rest unchanged
    # a second evaluation adds its tasks and replaces the section (never duplicates it)
    write_eval_results(target, {"results": {"taskarith_rev": {"exact_match,none": 0.25}}})
    text = (target / "README.md").read_text()
    assert text.count("## Evaluation") == 1 and "| taskarith_rev | exact_match | 0.2500 |" in text
    assert "taskarith_sum" in json.loads((target / "eval_results.json").read_text())["results"]
    # a plain model folder gets the JSON only
    plain = tmp_path / "plain"
    plain.mkdir()
    write_eval_results(plain, fake_results())
    assert sorted(p.name for p in plain.iterdir()) == ["eval_results.json"]


def test_write_eval_results_refreshes_a_merged_adapters_card(zoo, tmp_path):
    from huggingface_hub import ModelCard

    from hf_taskarith.method_merge import run_recipe
    from hf_taskarith.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "base": str(zoo["llama_base"]), "method": "task_arithmetic",
        "tasks": [{"adapter": str(zoo["lora_plain"])}, {"adapter": str(zoo["lora_b"])}],
        "output": {"format": "adapter"},
    }))
    folder = run_recipe(load_recipe(recipe), tmp_path / "adapter")
    write_eval_results(folder, fake_results())
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model_relation == "adapter"  # the rest of the adapter card stays
    assert {(r.dataset_name, r.metric_value) for r in card.data.eval_results} >= {("taskarith_sum", 0.75)}
    assert "| taskarith_sum | acc | 0.7500 |" in card.text


def test_card_results_reach_a_fresh_save(merge_and_folder, tmp_path):
    from hf_taskarith.evaluation import attach_eval_results

    merged, _ = merge_and_folder
    attach_eval_results(merged, fake_results())
    try:
        out = merged.save_pretrained(tmp_path / "again", progress=False)
    finally:
        merged.eval_results = None
    assert "model-index" in (out / "README.md").read_text()


def test_compare_normalises_by_each_tasks_own_finetune(zoo, merge_and_folder):
    merged, _ = merge_and_folder
    tasks = ["taskarith_letters", "taskarith_count_up"]
    cmp = compare(zoo["llama_base"], {"letters": zoo["llama_ft_b"], "count_up": zoo["llama_ft_a"]}, merged, tasks, limit=8)
    assert cmp["task_map"] == {"taskarith_letters": "letters", "taskarith_count_up": "count_up"}
    assert list(cmp["scores"]) == ["base", "letters", "count_up", "merged"]
    for task, ft in cmp["task_map"].items():
        own = cmp["scores"][ft][task]
        want = cmp["scores"]["merged"][task] / own if own else None
        assert cmp["normalized"][task] == (pytest.approx(want) if want is not None else None)
    lines = cmp["table"].splitlines()
    assert lines[0].startswith("| task | metric | base | letters | count_up | merged | normalised")
    assert lines[-1].startswith("| **mean** |") and len(lines) == 2 + len(tasks) + 1
    with pytest.raises(TaskArithError, match="task map"):
        compare(zoo["llama_base"], {"a": zoo["llama_ft_a"]}, merged, tasks, task_map={"taskarith_letters": "zzz"})


# ------------------------------------------------------------------------------ CLI
def test_cli_eval_writes_json_and_table(zoo, merge_and_folder, tmp_path, monkeypatch, capsys):
    _, folder = merge_and_folder
    out = tmp_path / "res" / "r.json"
    code = run_cli(["eval", str(folder), "--tasks", "taskarith_count_up,taskarith_rev", "--limit", "4",
                    "--batch-size", "4", "--output", str(out)], monkeypatch)
    assert code == 0
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"taskarith_count_up", "taskarith_rev"}
    table = out.with_suffix(".md").read_text()
    assert table.startswith("| task | metric | value | stderr |") and table.strip() in capsys.readouterr().out

    # a recipe is merged in memory; --compare adds the base and the finetunes
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(zoo["llama_base"]), "method": "task_arithmetic",
                                      "parameters": {"lambda": 0.5}, "tasks": [{"model": str(zoo["llama_ft_a"])}]}))
    cmp_out = tmp_path / "cmp.json"
    code = run_cli(["eval", str(recipe), "--tasks", "taskarith_count_up", "--limit", "3", "--compare",
                    "--base", str(zoo["llama_base"]), "--finetune", f"up={zoo['llama_ft_a']}",
                    "--task-map", "taskarith_count_up=up", "--output", str(cmp_out)], monkeypatch)
    assert code == 0
    data = json.loads(cmp_out.read_text())
    assert list(data["scores"]) == ["base", "up", "merged"] and "normalised" in cmp_out.with_suffix(".md").read_text()


def test_cli_eval_errors_are_one_line(zoo, tmp_path, monkeypatch, capsys):
    code = run_cli(["eval", str(zoo["llama_base"]), "--tasks", "taskarith_sum", "--limit", "x"], monkeypatch)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--limit" in err and len(err.splitlines()) == 1
    code = run_cli(["eval", str(zoo["llama_base"]), "--tasks", "taskarith_sum", "--compare"], monkeypatch)
    assert code == 2 and "--base" in capsys.readouterr().err
    code = run_cli(["eval", str(tmp_path / "nope.yaml"), "--tasks", "taskarith_sum"], monkeypatch)
    assert code == 2 and "not found" in capsys.readouterr().err


def test_cli_search_negation_writes_results_table_plot_and_recipe(zoo, tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "neg.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(zoo["llama_base"]), "method": "task_arithmetic",
                                      "tasks": [{"model": str(zoo["llama_ft_c"]), "weight": -1.0}]}))
    out = tmp_path / "search"
    tuned = tmp_path / "tuned.yaml"
    code = run_cli(["search", str(recipe), "--rule", "negation", "--val-tasks", "taskarith_letters",
                    "--control-tasks", "taskarith_count_up", "--grid", "0,0.5", "--limit", "4", "--batch-size", "4",
                    "--out", str(out), "--write-recipe", str(tuned)], monkeypatch)
    assert code == 0
    data = json.loads((out / "search_results.json").read_text())
    assert data["rule"] == "negation" and [p["lambda"] for p in data["points"]] == [0.0, 0.5]
    assert data["points"][0]["feasible"] is True  # λ = 0 is the base: always within the bound
    assert (out / "search_plot.png").read_bytes()[:4] == b"\x89PNG"
    assert "control ≥ bound" in (out / "search_table.md").read_text()
    printed = capsys.readouterr().out
    assert json.loads(printed.strip().splitlines()[-1]) == data["chosen"]
    from hf_taskarith.recipe import load_recipe

    assert load_recipe(tuned).parameters["lambda"] == data["chosen"]["lambda"]
    code = run_cli(["search", str(recipe), "--rule", "negation", "--val-tasks", "taskarith_letters"], monkeypatch)
    assert code == 2 and "control" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_data_parallel_eval_matches_one_process(zoo, merge_and_folder, tmp_path):
    """torchrun (as accelerate launch does) with 2 gloo ranks: requests are sharded, rank 0 writes."""
    import subprocess
    import sys

    _, folder = merge_and_folder
    script = tmp_path / "run.py"
    script.write_text("import sys\nfrom hf_taskarith import cli\nsys.exit(cli.main(sys.argv[1:]))\n")
    out = tmp_path / "dp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), "eval", str(folder),
         "--tasks", "taskarith_count_up", "--batch-size", "4", "--output", str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "on rank 1" in proc.stderr  # the second rank took its share
    single = evaluate(folder, ["taskarith_count_up"], batch_size=4)
    assert json.loads(out.read_text())["results"] == single["results"]
