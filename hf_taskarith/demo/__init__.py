"""``make demo``: task arithmetic end to end, offline, on models built here in a few minutes.

1. builds a small language model: a word-level tokenizer trained with ``tokenizers``, a 2-layer
   Llama, pretrained briefly on a corpus mixing several skills (counting up well, some letters
   counting down and string reversal, the formats of the other tasks);
2. finetunes it (with replay of pretraining data, except U): A = count digits down (full finetune),
   B = continue a letter run (PEFT LoRA), A' = A as a LoRA, U = count letters down (the
   "unwanted" behaviour, partly present in the base; full finetune);
3. builds task vectors and merges them through recipes, choosing every λ on the VALIDATION
   splits with the in-memory search: task arithmetic A+B, TIES A+B, a LoRA-native adapter merge
   A'+B (a PEFT adapter out), negation base − λ·U, and the merge of one-epoch finetunes A₁+B₁
   (vs converged, the comparison of arXiv:2508.16082);
4. evaluates base, finetunes and merges with lm-eval on the TEST splits of ``recipes/tasks``
   and prints a table (accuracy, normalised accuracy, addition, forgetting);
5. writes ``results.json``, ``table.md``, PNG plots, the tuned recipes and the merged models
   (with model cards) into the output folder, and pushes the TA merge with ``--push-to-hub``.

Run: ``python -m hf_taskarith.demo --out demo_output``. Models, searches and evaluations are
cached under ``<out>/cache/<hash of the config and data>``: a second run takes seconds.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from .build import DemoConfig, Finetune

__all__ = ["DemoConfig", "Finetune", "run_demo", "main"]

logger = logging.getLogger("hf_taskarith.demo")


def run_demo(
    out: Union[str, os.PathLike] = "demo_output",
    config: Optional[DemoConfig] = None,
    *,
    push_to_hub: Optional[str] = None,
    private: Optional[bool] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """Run the whole demo and write its outputs.

    Args:
        out: output folder (created; cached artifacts are reused from ``out/cache``).
        config: the models and training set-up (default :class:`DemoConfig`).
        push_to_hub: a repo id to push the TA merge to (honours ``HF_ENDPOINT``/``HF_TOKEN``).
        private: visibility of a repo created by the push.
        progress: training progress bars.

    Returns:
        The results dict written to ``out/results.json`` (``rows``, ``claims``,
        ``epoch1_vs_converged``, ``table``...).

    Raises:
        TaskArithError: missing task data, or a failed push.
    """
    from ..evaluation import save_results
    from .pipeline import run_pipeline
    from .report import plot_bars

    start = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = run_pipeline(out, config or DemoConfig(), progress=progress)
    plots = {"accuracy": plot_bars(results, out / "plots" / "accuracy.png")}
    for name in results["searches"]:
        plots[f"search_{name}"] = out / "search" / name / "search_plot.png"
    results["outputs"]["plots"] = {k: str(v) for k, v in plots.items()}
    (out / "table.md").write_text(results["table"] + "\n")
    if push_to_hub:
        from ..hub import push_folder

        results["outputs"]["pushed"] = push_folder(results["outputs"]["merges"]["ta"], push_to_hub, private=private,
                                                   commit_message="Task-arithmetic merge from the hf_taskarith demo")
    results["seconds"] = round(time.time() - start, 1)
    save_results(results, out / "results.json")
    return results


def _print_report(results: Dict[str, Any], out: Path) -> None:
    c = results["claims"]
    neg = c["negation"]
    e = results["epoch1_vs_converged"]
    print()
    print(results["table"])
    print()
    a = ", ".join(f"{k.replace('taskarith_', '')} {v:.2f}" for k, v in c["addition_ta"].items())
    print(f"addition: the TA merge of A (full) and B (LoRA) keeps {a} of each finetune's test accuracy")
    print(f"negation: letters_down {neg['unwanted_base']:.2f} (base) → {neg['unwanted_finetuned']:.2f} (finetuned U) → "
          f"{neg['unwanted_negated']:.2f} (base − λU); control count_up {neg['control_base']:.2f} → "
          f"{neg['control_negated']:.2f} ({100 * (neg['control_kept'] or 0):.0f}% of base)")
    n1 = e["epoch1"]["normalized_vs_converged_finetunes"]
    nc = e["converged"]["normalized"]
    print("one epoch vs converged (normalised by the converged finetunes): "
          + ", ".join(f"{k.replace('taskarith_', '')} {n1[k]:.2f} vs {nc[k]:.2f}" for k in nc)
          + f" (converged τ is {e['norm_ratio_converged_over_epoch1']:.1f}× longer; λ grid scaled by it)")
    print(f"\nresults: {out / 'results.json'}, table: {out / 'table.md'}, plots: {out / 'plots'}/ and {out / 'search'}/*/,"
          f" merged models with model cards: {out / 'merges'}/, tuned recipes: {out / 'recipes'}/")
    if results["outputs"].get("pushed"):
        print(f"pushed the TA merge: {results['outputs']['pushed']}")
    print(f"done in {results['seconds']:.0f}s")


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m hf_taskarith.demo [--out DIR] [--push-to-hub REPO_ID] [--private] [--quiet]``."""
    from ..errors import TaskArithError

    parser = argparse.ArgumentParser(prog="python -m hf_taskarith.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="push the TA merge to this Hub repo "
                        "(HF_ENDPOINT / HF_TOKEN are honoured)")
    parser.add_argument("--private", action="store_true", help="create the pushed repo as private")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("hf_taskarith.search", "hf_taskarith.engine", "hf_taskarith.evaluation", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "0" if args.push_to_hub else "1")
    try:
        results = run_demo(args.out, push_to_hub=args.push_to_hub, private=args.private or None,
                           progress=not args.quiet)
    except TaskArithError as err:
        print(f"error: {err}")
        return 1
    _print_report(results, Path(args.out))
    return 0
