"""``hf-taskarith eval`` and ``hf-taskarith search``: lm-eval evaluation and coefficient search.

Registered on the main parser by ``add_eval_commands(sub)``. Each command takes the parsed
``args`` and returns an exit code; bad input raises :class:`~hf_taskarith.errors.TaskArithError`
(the main CLI prints it on one line).

Multi-process (data-parallel) evaluation::

    accelerate launch --multi_gpu --num_processes 8 -m hf_taskarith eval MODEL --tasks ... --device cuda
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Dict, List, Optional

from .errors import TaskArithError

logger = logging.getLogger("hf_taskarith")


def _pairs(items: Optional[List[str]], what: str) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise TaskArithError(f"{what}: expected NAME=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _limit(value: Optional[str]):
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        raise TaskArithError(f"--limit: {value!r} is not a number") from None
    if number <= 0:
        raise TaskArithError("--limit: must be positive")
    return int(number) if number >= 1 and number == int(number) else number


def _batch_size(value: str):
    if value.startswith("auto"):
        return value
    try:
        size = int(value)
    except ValueError:
        raise TaskArithError(f"--batch-size: {value!r} (an integer or auto)") from None
    if size < 1:
        raise TaskArithError("--batch-size: must be at least 1")
    return size


def _model_arg(ref: str):
    """A recipe YAML is merged in memory; anything else is a folder or Hub id."""
    path = Path(ref)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise TaskArithError(f"{ref}: recipe file not found")
        from .method_merge import build_merge
        from .recipe import load_recipe

        return build_merge(load_recipe(path))
    return ref


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate MODEL (folder, Hub id or recipe, merged in memory) and write results JSON + table."""
    from .evaluation import compare, evaluate, results_table, save_results, split_tasks, write_eval_results

    tasks = split_tasks(args.tasks)
    kwargs = dict(
        include_path=args.include_path, limit=_limit(args.limit), batch_size=_batch_size(args.batch_size),
        device=args.device, num_fewshot=args.num_fewshot, split=args.split, dtype=args.dtype,
        log_samples=args.log_samples,
    )
    output = Path(args.output)
    table_path = output.with_suffix(".md")
    if args.compare:
        if not args.base:
            raise TaskArithError("eval --compare: give --base REF")
        finetunes = _pairs(args.finetune, "--finetune")
        if not finetunes:
            raise TaskArithError("eval --compare: give at least one --finetune NAME=REF")
        cmp = compare(
            args.base, finetunes, _model_arg(args.model), tasks, task_map=_pairs(args.task_map, "--task-map") or None,
            metric=args.metric, **kwargs,
        )
        if not cmp:
            return 0  # not the main process
        save_results({k: v for k, v in cmp.items() if k != "table"}, output)
        _write_text(table_path, cmp["table"])
        print(cmp["table"])
        print(f"\nresults: {output}  table: {table_path}")
        return 0
    if args.base or args.finetune or args.task_map:
        raise TaskArithError("eval: --base/--finetune/--task-map go with --compare")
    results = evaluate(_model_arg(args.model), tasks, **kwargs)
    if results is None:
        return 0  # ranks other than 0 of a multi-process run
    save_results(results, output)
    table = results_table(results)
    _write_text(table_path, table)
    print(table)
    print(f"\nresults: {output}  table: {table_path}")
    if args.update_card:
        folder = Path(args.model)
        if not folder.is_dir():
            raise TaskArithError("eval --update-card: MODEL must be a local folder")
        print(f"model folder: {write_eval_results(folder, results)}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """Search λ (and optionally per-task weights) for a recipe on validation tasks."""
    from .search import search, write_recipe

    finetuned = {}
    for task, value in _pairs(args.finetune_acc, "--finetune-acc").items():
        try:
            finetuned[task] = float(value)
        except ValueError:
            raise TaskArithError(f"--finetune-acc: {value!r} is not a number") from None
    result = search(
        args.recipe,
        args.val_tasks,
        rule=args.rule,
        grid=args.grid,
        control_tasks=args.control_tasks,
        threshold=args.threshold,
        finetuned_scores=finetuned or None,
        task_map=_pairs(args.task_map, "--task-map") or None,
        coordinate=args.coordinate,
        sweeps=args.sweeps,
        limit=_limit(args.limit),
        batch_size=_batch_size(args.batch_size),
        device=args.device,
        dtype=args.dtype,
        include_path=args.include_path,
        split=None if args.split == "default" else args.split,
        metric=args.metric,
        cache=not args.no_cache,
        restore=args.restore,
    )
    paths = result.save(args.out)
    print(result.table())
    print("\n" + result.summary())
    print(f"results: {paths['json']}  table: {paths['table']}  plot: {paths['plot']}")
    if args.write_recipe:
        print(f"recipe: {write_recipe(args.recipe, result, args.write_recipe)}")
    print(json.dumps(result.chosen))
    return 0


def _common_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--include-path", default=None, metavar="DIR",
                   help="folder of lm-eval task YAML files (default: the shipped recipes/tasks, then lm-eval's own)")
    p.add_argument("--limit", default=None, help="examples per task (an integer) or a fraction (< 1)")
    p.add_argument("--batch-size", default="1", help="lm-eval batch size: an integer or auto (default 1)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1...")
    p.add_argument("--dtype", default=None, help="model dtype: bfloat16, float16, float32 (default: the checkpoint's)")
    p.add_argument("--metric", default=None, help="metric to score tasks by (default: acc, else exact_match...)")


def add_eval_commands(subparsers) -> None:
    """Register ``eval`` and ``search`` on the main CLI's subparsers."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model, merge folder or recipe (in memory) with lm-eval",
        description="Evaluate with lm-evaluation-harness. MODEL is a folder, org/name[@rev] or a recipe YAML "
        "(merged in memory, nothing written). Writes results JSON and a markdown table.",
    )
    p.add_argument("model", help="model folder, Hub id or recipe .yaml (merged in memory)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks (e.g. taskarith_count_up,taskarith_sum)")
    _common_eval_options(p)
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    p.add_argument("--split", default=None, help="evaluate this split (default: test when the task has one)")
    p.add_argument("--output", default="eval_results.json", help="results JSON (default eval_results.json; the table goes beside it as .md)")
    p.add_argument("--log-samples", action="store_true", help="keep per-example records in the JSON")
    p.add_argument("--update-card", action="store_true",
                   help="also write eval_results.json into MODEL's folder and refresh its model card (hf_taskarith merges)")
    p.add_argument("--compare", action="store_true", help="also evaluate --base and each --finetune; normalised accuracy")
    p.add_argument("--base", default=None, help="with --compare: the base model")
    p.add_argument("--finetune", action="append", metavar="NAME=REF", help="with --compare: a finetune (repeat)")
    p.add_argument("--task-map", action="append", metavar="TASK=NAME", help="with --compare: the finetune of a task")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser(
        "search",
        help="choose λ (or per-task weights) of a recipe on validation tasks, in memory",
        description="Load the base once, apply λ·τ in place for every grid point, evaluate on the validation split, "
        "revert exactly. Writes search_results.json, search_table.md and search_plot.png.",
    )
    p.add_argument("recipe", help="merge recipe YAML (task_arithmetic, or any method with lambda/alpha)")
    p.add_argument("--val-tasks", required=True, help="comma-separated tasks scored (negation: the target tasks)")
    p.add_argument("--rule", choices=["addition", "negation"], default="addition",
                   help="addition: max mean normalised accuracy; negation: min target acc with control kept")
    p.add_argument("--grid", default="0:1:0.05", help="λ grid: start:stop:step (stop included) or a comma list")
    p.add_argument("--control-tasks", default=None, help="negation: comma-separated control tasks")
    p.add_argument("--threshold", type=float, default=0.95, help="negation: keep control acc >= this × base (default 0.95)")
    p.add_argument("--finetune-acc", action="append", metavar="TASK=ACC",
                   help="addition: a task's finetuned accuracy (else each finetune is evaluated once)")
    p.add_argument("--task-map", action="append", metavar="TASK=INDEX|NAME",
                   help="addition: which recipe task (index or name) is a validation task's finetune")
    p.add_argument("--coordinate", action="store_true", help="then search each task's weight on the grid (coordinate steps)")
    p.add_argument("--sweeps", type=int, default=2, help="coordinate sweeps (default 2)")
    _common_eval_options(p)
    p.add_argument("--split", default="validation", help="split to score (default validation; 'default' for lm-eval's)")
    p.add_argument("--no-cache", action="store_true", help="recompute deltas at every point instead of caching fp32 on CPU")
    p.add_argument("--restore", choices=["copy", "reload"], default="copy",
                   help="exact revert from a copy of the changed weights (default) or by re-reading the base checkpoint")
    p.add_argument("--out", default="search_results", help="output folder (default search_results)")
    p.add_argument("--write-recipe", default=None, metavar="PATH", help="write the recipe with the chosen values")
    p.set_defaults(func=cmd_search)
