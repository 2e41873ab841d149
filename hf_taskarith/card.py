"""Model cards for merged models and adapters, built with huggingface_hub's ``ModelCard``.

The card says exactly what was merged: every input with its resolved commit and weight
(negation shown as such), the method and its paper, the full recipe, how to load the result,
and evaluation results (also as ``model-index``). Local inputs are named by folder name, never
by absolute path, and nothing here ever sees a token.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

logger = logging.getLogger(__name__)

TA_PAPER = "Editing Models with Task Arithmetic (Ilharco et al., ICLR 2023) — https://arxiv.org/abs/2212.04089"


def _input_license(path: Optional[Path]) -> Optional[str]:
    if path is None or not (Path(path) / "README.md").is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(Path(path) / "README.md").data.to_dict().get("license")
    except Exception:  # a malformed upstream card must not stop our merge
        return None


def _weight_text(weight: Any) -> str:
    if isinstance(weight, (int, float)):
        return f"{weight:g} (negation)" if weight < 0 else f"{weight:g}"
    return str(weight)


def card_eval_results(card_results) -> Optional[list]:
    """``[{"task", "metric", "value", "dataset"?, "dataset_name"?}, ...]`` → ``EvalResult`` list for
    ``ModelCardData.eval_results`` (``None`` when empty, so no empty ``model-index`` is written)."""
    from huggingface_hub import EvalResult

    return [
        EvalResult(
            task_type="text-generation",
            dataset_type=r.get("dataset", r["task"]),
            dataset_name=r.get("dataset_name", r["task"]),
            metric_type=r["metric"],
            metric_value=float(r["value"]),
        )
        for r in card_results
    ] or None


def build_model_card(
    description: Dict[str, Any],
    *,
    base_path: Optional[Path] = None,
    input_paths: Sequence[Optional[Path]] = (),
    base_repo_id: Optional[str] = None,
    input_repo_ids: Sequence[Optional[str]] = (),
    output_format: str = "model",
    recipe_yaml: Optional[str] = None,
    eval_results: Optional[List[Dict[str, Any]]] = None,
    repo_id: Optional[str] = None,
):
    """Build the card of a merge.

    Args:
        description: ``merge.describe()`` (method, paper, base, tasks with name/commit/weight).
        base_path, input_paths: Local folders of the inputs (only used to read their licenses).
        base_repo_id, input_repo_ids: Hub ids (``None`` for local inputs).
        output_format: ``model`` (full weights) or ``adapter`` (PEFT adapter).
        recipe_yaml: The recipe as YAML, shown in full.
        eval_results: ``[{"task": ..., "metric": ..., "value": ..., "dataset": ...}]`` to report.
        repo_id: Where the card will live (used in the loading snippet).

    Returns:
        A ``huggingface_hub.ModelCard``.
    """
    from huggingface_hub import ModelCard, ModelCardData

    method = description.get("method", "task_arithmetic")
    paper = description.get("paper") or TA_PAPER
    # "arXiv:2306.01708" / "arXiv 2306.01708" -> a link to the paper
    paper = re.sub(r"arXiv[: ]?(\d{4}\.\d{4,5})", r"[arXiv:\1](https://arxiv.org/abs/\1)", paper)
    hub_inputs = [r for r in [base_repo_id, *input_repo_ids] if r]
    licenses = {_input_license(p) for p in [base_path, *input_paths]}
    license_ = licenses.pop() if len(licenses) == 1 else None
    is_adapter = output_format == "adapter"
    name = repo_id or "merged-model"
    data = ModelCardData(
        base_model=list(dict.fromkeys(hub_inputs)) or None,
        base_model_relation="adapter" if is_adapter else "merge",
        library_name="peft" if is_adapter else "transformers",
        tags=["merge", "task-arithmetic", "hf-taskarith", method.replace("_", "-")],
        license=license_,
        model_name=name,
        eval_results=card_eval_results(eval_results or []),
    )
    rows = [
        "| role | input | commit | weight |",
        "|---|---|---|---|",
        f"| base | {description.get('base')} | {description.get('base_commit') or 'local'} | — |",
    ]
    for task in description.get("tasks", []):
        rows.append(
            f"| {task.get('kind', 'model')} | {task['name']} | {task.get('commit') or 'local'} | {_weight_text(task.get('weight'))} |"
        )
    if is_adapter:
        load = (
            "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{base_repo_id or description.get("base")}")\n'
            f'model = PeftModel.from_pretrained(base, "{name}")\n```'
        )
    else:
        load = (
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{name}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{name}")\n```'
        )
    sections = [
        f"# {name.split('/')[-1]}",
        f"This {'adapter' if is_adapter else 'model'} is a merge made with "
        f"[hf_taskarith](https://github.com/hf-taskarith/hf_taskarith) using **{method}**.",
        f"## Method\n\n{method}: {paper}",
        "## Inputs\n\n" + "\n".join(rows),
    ]
    if recipe_yaml:
        sections.append("## Recipe\n\n```yaml\n" + recipe_yaml.rstrip() + "\n```")
    sections.append("## How to load\n\n" + load)
    if eval_results:
        table = ["| task | metric | value |", "|---|---|---|"]
        table += [f"| {r['task']} | {r['metric']} | {float(r['value']):.4f} |" for r in eval_results]
        sections.append("## Evaluation\n\n" + "\n".join(table))
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"
    return ModelCard(content)
