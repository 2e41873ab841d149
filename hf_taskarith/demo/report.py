"""The demo's results: the table (absolute and normalised accuracy, addition, forgetting), the
results JSON and the PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from ..evaluation import primary_metric

SHORT = {"taskarith_count_up": "count_up", "taskarith_count_down": "count_down", "taskarith_rev": "rev",
         "taskarith_letters": "letters", "taskarith_letters_down": "letters_down"}


def summarise(rows, evals: Mapping[str, Mapping[str, Any]], searches: Mapping[str, Any], *, cfg, key: str,
              scale_epoch1: float, folders: Mapping[str, Path], recipes_dir: Path) -> Dict[str, Any]:
    """Scores per row, normalised accuracies, addition and forgetting, and the demo's claims.

    * normalised accuracy of a merge on a task = its accuracy / the accuracy of the task's own
      finetune (Ilharco et al. 2023);
    * addition = the mean normalised accuracy over the merged tasks;
    * forgetting = the base's control accuracy − this model's (positive: control skill lost).
    """
    from .pipeline import CONTROL, TASK_A, TASK_B, TASKS, UNWANTED

    scores = {name: {t: primary_metric(res["results"][t])[1] for t in TASKS} for name, res in evals.items()}
    metrics = {t: primary_metric(next(iter(evals.values()))["results"][t])[0] for t in TASKS}
    table_rows: List[Dict[str, Any]] = []
    for row in rows:
        s = scores[row.key]
        norm = {t: (s[t] / scores[ft][t] if scores[ft][t] else None) for t, ft in row.own.items()}
        defined = [v for v in norm.values() if v is not None]
        table_rows.append({
            "key": row.key, "label": row.label, "kind": row.kind, "scores": s,
            "normalized": norm, "addition": sum(defined) / len(defined) if defined else None,
            "forgetting": scores["base"][CONTROL] - s[CONTROL],
            "own_finetunes": dict(row.own),
        })
    by_key = {r["key"]: r for r in table_rows}
    base, neg, unw = scores["base"], scores["negation"], scores["letters_down"]
    # one epoch vs converged: also normalised by the one-epoch finetunes themselves
    ep1 = scores["ta_epoch1"]
    own1 = {TASK_A: scores["count_down@epoch1"][TASK_A], TASK_B: scores["letters@epoch1"][TASK_B]}
    claims = {
        "addition_ta": {t: by_key["ta"]["normalized"][t] for t in (TASK_A, TASK_B)},
        "negation": {
            "unwanted_base": base[UNWANTED], "unwanted_finetuned": unw[UNWANTED], "unwanted_negated": neg[UNWANTED],
            "cut": base[UNWANTED] - neg[UNWANTED], "half_gain": 0.5 * (unw[UNWANTED] - base[UNWANTED]),
            "control_base": base[CONTROL], "control_negated": neg[CONTROL],
            "control_kept": neg[CONTROL] / base[CONTROL] if base[CONTROL] else None,
        },
    }
    results: Dict[str, Any] = {
        "config": cfg.to_dict(), "cache_key": key, "tasks": TASKS, "metrics": metrics,
        "roles": {"control": CONTROL, "A (full finetune)": TASK_A, "B (LoRA)": TASK_B, "unwanted": UNWANTED},
        "rows": table_rows,
        "epoch1_vs_converged": {
            "norm_ratio_converged_over_epoch1": scale_epoch1,
            "grid": searches["ta_epoch1"].grid,
            "converged": {"lambda": searches["ta"].chosen.get("lambda"), "scores": scores["ta"],
                          "normalized": by_key["ta"]["normalized"]},
            "epoch1": {"lambda": searches["ta_epoch1"].chosen.get("lambda"), "scores": ep1,
                       "normalized_vs_converged_finetunes": by_key["ta_epoch1"]["normalized"],
                       "one_epoch_finetune_scores": own1,
                       "normalized_vs_one_epoch_finetunes": {t: (ep1[t] / v if v else None) for t, v in own1.items()}},
        },
        "searches": {name: {"rule": r.rule, "chosen": r.chosen, "objective": r.best["objective"],
                            "validation_tasks": r.val_tasks, "grid": r.grid} for name, r in searches.items()},
        "claims": claims,
        "outputs": {"merges": {k: str(v) for k, v in folders.items()}, "recipes": str(recipes_dir)},
    }
    results["table"] = table(results)
    return results


def _f(v: Optional[float]) -> str:
    return "—" if v is None else f"{v:.2f}"


def table(results: Mapping[str, Any]) -> str:
    """Markdown: one row per model; accuracy per task (test split), normalised accuracy of the
    merged tasks, addition (mean normalised) and forgetting (control accuracy lost)."""
    from .pipeline import CONTROL, OTHER, TASK_A, TASK_B, UNWANTED

    head = ["model", "count_up (control)", "count_down (A)", "letters (B)", "letters_down (unwanted)",
            "rev (other)", "norm. A", "norm. B", "addition", "forgetting"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["rows"]:
        s, n = r["scores"], r["normalized"]
        cells = [r["label"], _f(s[CONTROL]), _f(s[TASK_A]), _f(s[TASK_B]), _f(s[UNWANTED]), _f(s[OTHER]),
                 _f(n.get(TASK_A)), _f(n.get(TASK_B)), _f(r["addition"]), f"{r['forgetting']:+.2f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot_bars(results: Mapping[str, Any], path: Path) -> Path:
    """PNG: test accuracy of every model on every task (grouped bars)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = results["rows"]
    tasks = results["tasks"]
    fig = Figure(figsize=(11, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(tasks)
    for j, t in enumerate(tasks):
        xs = [i + (j - (len(tasks) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [r["scores"][t] for r in rows], width, label=SHORT.get(t, t))
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["label"].split("  ")[0] for r in rows], rotation=25, ha="right", fontsize=7)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title("hf_taskarith demo: test accuracy per model and task")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=len(tasks))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
