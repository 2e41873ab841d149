"""The demo pipeline: models → recipes → coefficient searches (validation) → merges → test evals.

Every step goes through the public API a practitioner would use on Hub models:
``Recipe`` → :func:`hf_taskarith.search.search` on validation splits → :func:`write_recipe` with
the chosen λ → :func:`run_recipe` (model or LoRA adapter output, with a model card) →
:func:`hf_taskarith.evaluation.evaluate` on test splits → :func:`write_eval_results` (card).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from .build import DemoConfig, build_models, data_fingerprint

logger = logging.getLogger("hf_taskarith.demo")

#: bump when the pipeline's outputs change meaning (invalidates cached searches and evals)
PIPELINE_VERSION = "4"

CONTROL = "taskarith_count_up"
TASK_A = "taskarith_count_down"  # full finetune
TASK_B = "taskarith_letters"  # PEFT LoRA
UNWANTED = "taskarith_letters_down"
OTHER = "taskarith_rev"  # a skill of the base no finetune trains (reported, not tuned on)
TASKS = [CONTROL, TASK_A, TASK_B, UNWANTED, OTHER]
GRID = "0:1.5:0.1"
#: negation: the paper's grid (at most the whole τ_U subtracted), and no control loss allowed on
#: validation (threshold 1.0): a margin for the claim's 95 % on test, where 30 items are noisy
NEGATION_GRID = "0:1:0.05"
NEGATION_THRESHOLD = 1.0


@dataclass
class Row:
    """One evaluated model of the demo table."""

    key: str
    label: str
    kind: str  # "base", "finetune", "merge", "negation"
    own: Dict[str, str]  # task -> key of the finetune that normalises it (merges)


def cache_key(cfg: DemoConfig) -> str:
    """Hash of the config, the task data and the pipeline version."""
    blob = json.dumps({"cfg": cfg.to_dict(), "data": data_fingerprint(), "v": PIPELINE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@contextlib.contextmanager
def _quiet_bars():
    """lm-eval draws a progress bar per request type and logs per task: keep the demo's own
    progress lines readable (our log handlers keep the real stderr)."""
    names = ["lm_eval", "lm-eval", "lm_eval.evaluator", "lm_eval.api.task", "lm_eval.models.huggingface",
             "lm_eval.tasks", "lm_eval.api.model"]
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for n, lvl in levels.items():
            logging.getLogger(n).setLevel(lvl)


class Cache:
    """JSON results under ``<out>/cache/<key>/`` so a second run re-evaluates nothing."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def get(self, name: str) -> Optional[Any]:
        path = self.folder / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def put(self, name: str, value: Any) -> Any:
        from ..evaluation import save_results

        save_results(value, self.folder / f"{name}.json")
        return value

    def memo(self, name: str, fn: Callable[[], Any]) -> Any:
        hit = self.get(name)
        return hit if hit is not None else self.put(name, fn())


def _recipe(base: Path, method: str, tasks: List[Dict[str, Any]], parameters: Optional[Dict[str, Any]] = None,
            output: Optional[Dict[str, Any]] = None):
    from ..recipe import Recipe

    # absolute paths: the written recipes work from any directory
    tasks = [{k: (str(Path(v).resolve()) if k in ("model", "adapter") else v) for k, v in t.items()} for t in tasks]
    data: Dict[str, Any] = dict(base=str(Path(base).resolve()), method=method, tasks=tasks, dtype="float32",
                                parameters=dict(parameters or {"lambda": 1.0}))
    if output:
        data["output"] = output
    return Recipe(**data)


def run_pipeline(out: Path, cfg: DemoConfig, *, progress: bool = True) -> Dict[str, Any]:
    """Build, search, merge and evaluate; returns the results dict (also written as results.json).

    Args:
        out: the demo output folder (models and results are cached under ``out/cache/<key>``).
        cfg: the demo configuration.
        progress: show progress bars while training.
    """
    from .. import TaskVector
    from ..evaluation import evaluate, write_eval_results
    from ..method_merge import build_merge, run_recipe
    from ..recipe import load_recipe
    from ..search import SearchResult, search, write_recipe

    t0 = time.time()
    torch.set_num_threads(cfg.threads)
    key = cache_key(cfg)
    cache = Cache(out / "cache" / key)
    stages = 5

    def stage(i: int, text: str) -> None:
        logger.info("[%d/%d %5.1fs] %s", i, stages, time.time() - t0, text)

    def bar(total: int, desc: str):
        if not progress:
            return contextlib.nullcontext(None)
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=False, unit="step")

    stage(1, f"models (cached in {out / 'cache' / 'models'})")
    paths = build_models(out / "cache" / "models", cfg, bar)
    base = paths["base"]

    recipes_dir = out / "recipes"
    recipes_dir.mkdir(parents=True, exist_ok=True)
    ab = [{"model": str(paths["count_down"])}, {"adapter": str(paths["letters"])}]
    recipes = {
        "ta": _recipe(base, "task_arithmetic", ab),
        "ties": _recipe(base, "ties", ab, {"lambda": 1.0, "density": 0.2}),
        "adapter": _recipe(base, "task_arithmetic", [{"adapter": str(paths["count_down_lora"])}, {"adapter": str(paths["letters"])}],
                           output={"format": "adapter", "mode": "exact"}),
        "negation": _recipe(base, "task_arithmetic", [{"model": str(paths["letters_down"]), "weight": -1.0}]),
        "ta_epoch1": _recipe(base, "task_arithmetic", [{"model": str(paths["count_down@epoch1"])},
                                                      {"adapter": str(paths["letters@epoch1"])}]),
    }
    # one-epoch task vectors are short: search λ over the same grid scaled by their norm ratio
    scale = _norm_ratio(base, [paths["count_down"], paths["letters"]],
                        [paths["count_down@epoch1"], paths["letters@epoch1"]])
    grids = {name: GRID for name in recipes}
    grids["negation"] = NEGATION_GRID
    grids["ta_epoch1"] = ",".join(f"{round(scale * i / 10, 4):g}" for i in range(16))

    # ---------------------------------------------------------------- searches (validation)
    searches: Dict[str, SearchResult] = {}
    plan = [("ta", "addition", [TASK_A, TASK_B]), ("ties", "addition", [TASK_A, TASK_B]),
            ("adapter", "addition", [TASK_A, TASK_B]), ("negation", "negation", [UNWANTED]),
            ("ta_epoch1", "addition", [TASK_A, TASK_B])]
    for i, (name, rule, vals) in enumerate(plan):
        stage(2, f"search {name}: rule {rule}, validation {', '.join(vals)} ({i + 1}/{len(plan)})")

        def run_search(name=name, rule=rule, vals=vals):
            with _quiet_bars():
                res = search(recipes[name], vals, rule=rule, grid=grids[name], control_tasks=[CONTROL],
                             task_map={t: j for j, t in enumerate(vals)} if rule == "addition" else None,
                             threshold=NEGATION_THRESHOLD if rule == "negation" else 0.95,
                             batch_size=64, split="validation")
            return res.to_dict()

        searches[name] = SearchResult(**cache.memo(f"search_{name}", run_search))
        logger.info("    %s", searches[name].summary())
        searches[name].save(out / "search" / name)

    # ---------------------------------------------------------------- merges (recipes with the chosen λ)
    stage(3, "merge with the chosen coefficients (recipes in recipes/, outputs in merges/)")
    folders: Dict[str, Path] = {}
    for name in ("ta", "ties", "adapter", "negation"):
        tuned = write_recipe(recipes[name], searches[name], recipes_dir / f"{name}.yaml")
        folders[name] = run_recipe(load_recipe(tuned), out / "merges" / name, overwrite=True, progress=False)
    tuned_epoch1 = write_recipe(recipes["ta_epoch1"], searches["ta_epoch1"], recipes_dir / "ta_epoch1.yaml")

    # ---------------------------------------------------------------- test evaluation
    rows = [
        Row("base", "base (pretrained)", "base", {}),
        Row("count_down", "finetune A: count_down (full)", "finetune", {}),
        Row("letters", "finetune B: letters (LoRA r=%d)" % _rank(cfg, "letters"), "finetune", {}),
        Row("count_down_lora", "finetune A': count_down (LoRA r=%d)" % _rank(cfg, "count_down_lora"), "finetune", {}),
        Row("letters_down", "finetune U: letters_down (unwanted, full)", "finetune", {}),
        Row("ta", "TA  A+B  λ=%s" % _lam(searches["ta"]), "merge", {TASK_A: "count_down", TASK_B: "letters"}),
        Row("ties", "TIES A+B  λ=%s" % _lam(searches["ties"]), "merge", {TASK_A: "count_down", TASK_B: "letters"}),
        Row("adapter", "LoRA merge A'+B → adapter  λ=%s" % _lam(searches["adapter"]), "merge",
            {TASK_A: "count_down_lora", TASK_B: "letters"}),
        Row("negation", "negation base − λ·U  λ=%s" % _lam(searches["negation"]), "negation", {}),
        Row("ta_epoch1", "TA one-epoch A₁+B₁  λ=%s" % _lam(searches["ta_epoch1"]), "merge",
            {TASK_A: "count_down", TASK_B: "letters"}),
    ]
    targets: Dict[str, Any] = {
        "base": base, "count_down": paths["count_down"], "letters": paths["letters"],
        "count_down_lora": paths["count_down_lora"], "letters_down": paths["letters_down"],
        **folders, "ta_epoch1": lambda: build_merge(load_recipe(tuned_epoch1)),
        # a LoRA-native merge is an adapter: evaluated applied to the base, in memory
        "adapter": lambda: TaskVector.from_adapter(folders["adapter"]).apply_to(base),
        "count_down@epoch1": paths["count_down@epoch1"], "letters@epoch1": paths["letters@epoch1"],
    }
    evals: Dict[str, Dict[str, Any]] = {}
    names = [r.key for r in rows] + ["count_down@epoch1", "letters@epoch1"]
    for i, name in enumerate(names):
        stage(4, f"evaluate {name} on the test splits ({i + 1}/{len(names)})")

        def run_eval(name=name):
            target = targets[name]
            with _quiet_bars():
                return evaluate(target() if callable(target) else str(target), TASKS, batch_size=64,
                                bootstrap_iters=1000)

        evals[name] = cache.memo(f"eval_{name}", run_eval)
    for name, folder in folders.items():
        write_eval_results(folder, evals[name])  # the model card gets an Evaluation section

    stage(5, "report")
    from .report import summarise

    results = summarise(rows, evals, searches, cfg=cfg, key=key, scale_epoch1=scale, folders=folders,
                        recipes_dir=recipes_dir)
    results["outputs"]["models"] = {k: str(v) for k, v in paths.items()}
    results["seconds"] = round(time.time() - t0, 1)
    return results


def _rank(cfg: DemoConfig, name: str) -> int:
    return next(f.rank for f in cfg.finetunes if f.name == name)


def _lam(res) -> str:
    if "weights" in res.chosen:  # coordinate search: one weight per task vector
        return "(" + ", ".join(f"{w:g}" for w in res.chosen["weights"]) + ")"
    return f"{res.chosen.get('lambda', res.chosen.get('alpha')):g}"


def _norm_ratio(base: Path, finals: List[Path], firsts: List[Path]) -> float:
    """‖Σ τ_final‖ / ‖Σ τ_epoch1‖ (L2 over every tensor): how much longer the converged task
    vectors are than the one-epoch ones."""
    from .. import BaseModel, TaskVector

    b = BaseModel(base)

    def tv(p: Path):
        return TaskVector.from_adapter(p) if (p / "adapter_config.json").is_file() else TaskVector.from_models(b, p)

    final = sum((tv(p) for p in finals[1:]), tv(finals[0]))
    first = sum((tv(p) for p in firsts[1:]), tv(firsts[0]))
    names = b.store.keys()
    nf = n1 = 0.0
    for n in names:
        if not b.store.dtype(n).is_floating_point:
            continue
        nf += float(final.delta(n, b).double().pow(2).sum())
        n1 += float(first.delta(n, b).double().pow(2).sum())
    return (nf / n1) ** 0.5 if n1 > 0 else 1.0
