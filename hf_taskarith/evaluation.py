"""Evaluate models and merges with lm-evaluation-harness, in memory.

    from hf_taskarith.evaluation import evaluate, results_table
    results = evaluate(merged, ["taskarith_count_up"], limit=100)   # a MergedModel: no disk round trip
    print(results_table(results))

``evaluate`` takes a local folder, a Hub id (``org/name[@rev]``), a recipe YAML, a
``transformers.PreTrainedModel`` or a merge (``MergedModel``/``MethodMerge``: materialised with
``to_model()``, never written to disk), wraps it in lm-eval's ``HFLM`` and runs
``lm_eval.simple_evaluate``. Tasks found in ``--include-path`` (default: the shipped
``recipes/tasks``) are indexed without lm-eval's built-in index (~17 s); other names fall back to
the full index. The result is lm-eval's results dict made JSON-safe.

Data-parallel evaluation: under ``accelerate launch`` / ``torchrun`` with more than one process,
each rank builds the model, lm-eval shards the requests over the ranks (this module wires
accelerate's state into ``HFLM``, which lm-eval only does for models it loads by name) and rank 0
gets the results; other ranks get ``None``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import TaskArithError

if TYPE_CHECKING:  # pragma: no cover
    import transformers

logger = logging.getLogger(__name__)

#: The offline digit tasks shipped with hf_taskarith (``recipes/tasks`` of the source tree).
SHIPPED_TASKS_DIR = Path(__file__).resolve().parent.parent / "recipes" / "tasks"
#: Metrics tried in order when a task's "accuracy" is asked for (then the first numeric metric).
PREFERRED_METRICS = ("acc", "exact_match", "acc_norm", "f1", "mcc", "bleu")
_NOT_METRICS = {"name", "alias", "sample_len", " ", "samples"}
_LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "webdataset", "imagefolder", "audiofolder"}
_TASK_MANAGERS: Dict[Tuple[Tuple[str, ...], bool], Any] = {}
# Messages lm-eval logs on every call for things that are intended here.
_QUIET = (
    "Custom kwargs can be passed",
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
)

ModelRef = Union[str, os.PathLike, Any]


# ----------------------------------------------------------------------------------- tasks
def shipped_tasks_dir() -> Optional[Path]:
    """The folder of the shipped ``taskarith_*`` tasks, if this installation has it."""
    return SHIPPED_TASKS_DIR if SHIPPED_TASKS_DIR.is_dir() else None


def split_tasks(tasks: Union[str, Sequence[str]]) -> List[str]:
    """``"a,b"`` or ``["a", "b,c"]`` → ``["a", "b", "c"]`` (order kept, duplicates dropped)."""
    items = [tasks] if isinstance(tasks, str) else list(tasks)
    out: List[str] = []
    for item in items:
        for name in str(item).split(","):
            name = name.strip()
            if name and name not in out:
                out.append(name)
    if not out:
        raise TaskArithError("tasks: give at least one lm-eval task name")
    return out


def _include_paths(include_path) -> List[str]:
    if include_path is None:
        return []
    items = include_path if isinstance(include_path, (list, tuple)) else [include_path]
    paths = []
    for item in items:
        for part in str(item).split(os.pathsep) if isinstance(item, str) else [item]:
            path = Path(part).expanduser()
            if not path.is_dir():
                raise TaskArithError(f"include path {str(path)!r} is not a folder of lm-eval task YAML files")
            paths.append(str(path.resolve()))
    return paths


def _known(tm, name: str) -> bool:
    if any(ch in name for ch in "*?["):
        return bool(tm.match_tasks([name]))
    return name in tm.all_tasks or Path(name).suffix in (".yaml", ".yml") and Path(name).is_file()


def get_task_manager(tasks: Sequence[str], include_path=None):
    """An lm-eval ``TaskManager`` that knows ``tasks``, as cheap as possible (cached per process).

    The shipped ``recipes/tasks`` and ``include_path`` are indexed first (milliseconds); lm-eval's
    built-in index (~17 s, once per process) is only built when a task is not found there.

    Raises:
        TaskArithError: if a task is unknown to both.
    """
    from lm_eval.tasks import TaskManager

    paths = _include_paths(include_path)
    shipped = shipped_tasks_dir()
    if shipped is not None and str(shipped) not in paths:
        paths = [str(shipped), *paths]  # first: a user's folder overrides a shipped task of the same name
    key_local = (tuple(paths), False)
    if paths:
        if key_local not in _TASK_MANAGERS:
            _TASK_MANAGERS[key_local] = TaskManager(include_path=paths, include_defaults=False)
        tm = _TASK_MANAGERS[key_local]
        if all(_known(tm, t) for t in tasks):
            return tm
    key_full = (tuple(paths), True)
    if key_full not in _TASK_MANAGERS:
        logger.info("indexing lm-eval's built-in tasks (for %s)", ", ".join(tasks))
        _TASK_MANAGERS[key_full] = TaskManager(include_path=paths or None, include_defaults=True)
    tm = _TASK_MANAGERS[key_full]
    unknown = [t for t in tasks if not _known(tm, t)]
    if unknown:
        where = f" (include path: {', '.join(paths)})" if paths else ""
        raise TaskArithError(f"tasks: unknown lm-eval task(s) {', '.join(unknown)}{where}")
    return tm


_SPLIT_ROLES = {"validation": "validation_split", "test": "test_split", "train": "training_split",
                "training": "training_split"}


def task_specs(tm, tasks: Sequence[str], split: Optional[str] = None) -> List[Any]:
    """Task names for ``simple_evaluate``; with ``split``, inline configs evaluated on that split.

    lm-eval evaluates a task's test split when it has one. ``split="validation"`` (what the
    coefficient search uses) loads each task's YAML and sets its evaluated split.
    """
    names: List[str] = []
    for t in tasks:
        names.extend(tm.match_tasks([t]) if any(ch in t for ch in "*?[") else [t])
    if split is None:
        return names
    from lm_eval.tasks._yaml_loader import load_yaml

    specs: List[Any] = []
    for name in names:
        entry = tm.task_index.get(name)
        kind = getattr(getattr(entry, "kind", None), "name", None)
        if kind == "TAG":
            specs.extend(task_specs(tm, sorted(entry.tags), split))
            continue
        if entry is None or kind != "TASK" or entry.yaml_path is None:
            raise TaskArithError(
                f"tasks: cannot choose the split of {name!r} (a group or Python task); list its tasks instead"
            )
        cfg = load_yaml(entry.yaml_path, resolve_func=True)
        for key in ("tag", "group"):
            cfg.pop(key, None)
        role = _SPLIT_ROLES.get(split)
        if role is not None:  # "validation" means the task's validation split, whatever its name
            if not cfg.get(role):
                raise TaskArithError(f"{name}: the task has no {split} split ({role} is not set in its YAML)")
            cfg["test_split"] = cfg[role]
        else:
            cfg["test_split"] = split  # a literal split name of the dataset
        specs.append(cfg)
    return specs


# ----------------------------------------------------------------------------------- models
def _tokenizer_from(path: Union[str, Path]):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as err:  # noqa: BLE001 - any loader failure becomes one clear line
        raise TaskArithError(f"{path}: cannot load a tokenizer ({type(err).__name__}: {err}); pass tokenizer=") from None


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"))


def _merge_to_model(merge, dtype):
    tok_dir = None
    recipe = getattr(merge, "recipe", None)
    if recipe is not None and getattr(recipe, "tokenizer_source", None):
        from .refs import resolve

        tok_dir = resolve(recipe.tokenizer_source).path
    model = merge.to_model(dtype=dtype if dtype is not None else getattr(recipe, "dtype", None))
    return model, tok_dir or merge.base.path, merge.base.resolved.display_name + " (merge, in memory)"


def load_model(
    model: ModelRef,
    *,
    tokenizer=None,
    device: Optional[str] = None,
    dtype=None,
) -> Tuple["transformers.PreTrainedModel", Any, str]:
    """Anything :func:`evaluate` accepts → ``(model in eval mode on device, tokenizer, label)``.

    Args:
        model: local folder (a model, or a PEFT LoRA adapter folder applied to its base in memory),
            ``org/name[@rev]``, a recipe ``.yaml`` (merged in memory), a ``Recipe``, a
            ``PreTrainedModel`` or a merge (``StreamingMerge``: ``to_model()``).
        tokenizer: a tokenizer object or reference (default: the model's, or the merge's base's).
        device: where the model runs (``cpu``, ``cuda``, ``cuda:1``...; default CPU, and a
            model object given stays where it is).
        dtype: ``bfloat16``/``float16``/``float32`` (default: the checkpoint's / the merge's).
    """
    import torch

    from .engine import StreamingMerge, parse_dtype, resolve_device

    from .method_merge import build_merge
    from .recipe import Recipe, load_recipe

    tok_ref: Any = None
    if isinstance(model, (str, os.PathLike)) and Path(model).suffix in (".yaml", ".yml") and Path(model).is_file():
        model = build_merge(load_recipe(model))
    elif isinstance(model, Recipe):
        model = build_merge(model)

    if isinstance(model, StreamingMerge):
        obj, tok_ref, label = _merge_to_model(model, dtype)
    elif isinstance(model, torch.nn.Module):
        obj, label = model, type(model).__name__ + " (in memory)"
        name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
        tok_ref = name or None
        if parse_dtype(dtype) is not None:
            obj = obj.to(parse_dtype(dtype))
    elif isinstance(model, (str, os.PathLike)):
        from .refs import resolve

        resolved = resolve(model)
        folder = resolved.path
        label = resolved.display_name
        if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
            from .task_vector import TaskVector

            cfg = json.loads((folder / "adapter_config.json").read_text())
            base_ref = cfg.get("base_model_name_or_path")
            if not base_ref:
                raise TaskArithError(f"{folder}: adapter_config.json names no base_model_name_or_path")
            merged = TaskVector.from_adapter(resolved).apply_to(base_ref)
            obj, tok_ref, _ = _merge_to_model(merged, dtype)
            tok_ref = folder if _has_tokenizer(folder) else tok_ref
        else:
            from transformers import AutoModelForCausalLM

            want = parse_dtype(dtype)
            try:
                obj = AutoModelForCausalLM.from_pretrained(str(folder), dtype=want if want is not None else "auto")
            except (OSError, ValueError) as err:
                raise TaskArithError(f"{model}: cannot load as a causal LM ({type(err).__name__}: {err})") from None
            tok_ref = folder
    else:
        raise TaskArithError(f"model: cannot evaluate a {type(model).__name__} (give a folder, Hub id, model or merge)")

    if tokenizer is None:
        if tok_ref is None:
            raise TaskArithError("tokenizer: the model does not say where its tokenizer is; pass tokenizer=")
        tokenizer = _tokenizer_from(tok_ref)
    elif isinstance(tokenizer, (str, os.PathLike)):
        from .refs import resolve

        tokenizer = _tokenizer_from(resolve(tokenizer).path)
    if device is not None or not isinstance(model, torch.nn.Module):
        obj = obj.to(resolve_device(device))  # a model object given without device stays where it is
    obj.eval()
    return obj, tokenizer, label


class _Quiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(msg.startswith(q) or q in msg[:120] for q in _QUIET)


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    filt = _Quiet()
    names = ["lm_eval", "lm_eval.api.task", "lm_eval.models.huggingface", "lm-eval"]
    loggers = [logging.getLogger(n) for n in names]
    handlers = [h for lg in loggers for h in lg.handlers] + logging.getLogger().handlers
    for obj in loggers + handlers:
        obj.addFilter(filt)
    try:
        yield
    finally:
        for obj in loggers + handlers:
            obj.removeFilter(filt)


_ENV_INFO: Dict[str, Any] = {}


@contextlib.contextmanager
def _fast_lm_eval() -> Iterator[None]:
    """lm-eval collects torch's environment report (~1.3 s) and the git hash on EVERY call:
    compute them once per process (same values), and ask git quietly."""
    import subprocess

    import lm_eval.evaluator as ev

    orig_env, orig_git = ev.add_env_info, ev.get_git_commit_hash

    def add_env_info(storage: Dict[str, Any]) -> None:
        if not _ENV_INFO:
            orig_env(_ENV_INFO)
        storage.update(copy.deepcopy(_ENV_INFO))

    def git_hash():
        if "git_hash" not in _ENV_INFO:
            try:
                out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10)
                _ENV_INFO["git_hash"] = out.stdout.strip() or None if out.returncode == 0 else None
            except (OSError, subprocess.SubprocessError):
                _ENV_INFO["git_hash"] = None
        return _ENV_INFO["git_hash"]

    ev.add_env_info, ev.get_git_commit_hash = add_env_info, git_hash
    try:
        yield
    finally:
        ev.add_env_info, ev.get_git_commit_hash = orig_env, orig_git


_ACCELERATORS: Dict[bool, Any] = {}


def distributed_world_size() -> int:
    """Processes of this launch (``WORLD_SIZE`` set by ``accelerate launch``/``torchrun``; 1 otherwise)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _distributed_accelerator(device: Optional[str]):
    """accelerate's ``Accelerator`` when launched with more than one process, else ``None``."""
    if distributed_world_size() <= 1:
        return None
    cpu = str(device or "cpu").startswith("cpu")
    if cpu not in _ACCELERATORS:
        from accelerate import Accelerator

        _ACCELERATORS[cpu] = Accelerator(cpu=cpu)
    acc = _ACCELERATORS[cpu]
    return acc if acc.num_processes > 1 else None


class ModelEvaluator:
    """One in-memory model wrapped in lm-eval's ``HFLM`` once, evaluated as often as wanted.

    The coefficient search changes the model's weights in place between :meth:`run` calls; the
    wrapper reads the weights at every call (lm-eval's request cache is not used).

    Args:
        model: a ``transformers.PreTrainedModel`` (already on its device).
        tokenizer: its tokenizer object.
        batch_size: lm-eval batch size (``int`` or ``"auto"``).
        max_length: override the context length lm-eval derives from the config.
        distributed: under a multi-process launch, shard requests over the ranks (rank 0 gets
            the results); ``False`` evaluates everything in this process.
    """

    def __init__(self, model, tokenizer, *, batch_size: Union[int, str] = 1, max_length: Optional[int] = None,
                 distributed: bool = True):
        from lm_eval.models.huggingface import HFLM

        self.model = model
        self.tokenizer = tokenizer
        acc = _distributed_accelerator(str(getattr(model, "device", "cpu"))) if distributed else None
        if acc is not None and model.device != acc.device:
            model.to(acc.device)
        with _quiet_lm_eval():
            self.lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        if acc is not None:
            # lm-eval wires accelerate only for models it loads by name; do the same for ours.
            self.lm.accelerator = acc
            self.lm._device = acc.device
            self.lm._rank = acc.process_index
            self.lm._world_size = acc.num_processes

    @property
    def rank(self) -> int:
        return self.lm.rank

    def run(
        self,
        tasks: Union[str, Sequence[str]],
        *,
        include_path=None,
        limit: Union[int, float, None] = None,
        num_fewshot: Optional[int] = None,
        split: Optional[str] = None,
        bootstrap_iters: int = 100000,
        log_samples: bool = False,
        gen_kwargs: Optional[Union[str, Dict[str, Any]]] = None,
        random_seed: int = 0,
    ) -> Optional[Dict[str, Any]]:
        """``lm_eval.simple_evaluate`` on this model; JSON-safe results (``None`` on ranks ≠ 0)."""
        import lm_eval

        names = split_tasks(tasks)
        tm = get_task_manager(names, include_path)
        specs = task_specs(tm, names, split)
        with _quiet_lm_eval(), _fast_lm_eval():
            results = lm_eval.simple_evaluate(
                model=self.lm,
                tasks=specs,
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=tm,
                log_samples=log_samples,
                bootstrap_iters=bootstrap_iters,
                gen_kwargs=gen_kwargs,
                random_seed=random_seed,
                numpy_random_seed=random_seed + 1234,
                torch_random_seed=random_seed + 1234,
                fewshot_random_seed=random_seed + 1234,
            )
        if results is None:
            return None
        out = jsonable(dict(results))
        if not log_samples:
            out.pop("samples", None)
        out["hf_taskarith"] = {"split": split or "default (test if the task has one)", "tasks": names}
        return out


def evaluate(
    model: ModelRef,
    tasks: Union[str, Sequence[str]],
    *,
    include_path=None,
    limit: Union[int, float, None] = None,
    batch_size: Union[int, str] = 1,
    device: Optional[str] = None,
    tokenizer=None,
    num_fewshot: Optional[int] = None,
    split: Optional[str] = None,
    dtype=None,
    bootstrap_iters: int = 100000,
    log_samples: bool = False,
    gen_kwargs: Optional[Union[str, Dict[str, Any]]] = None,
    max_length: Optional[int] = None,
) -> Optional[Dict[str, Any]]:
    """Evaluate a model or a merge on lm-eval tasks, in memory.

    Args:
        model: local folder, ``org/name[@rev]``, recipe ``.yaml``, ``PreTrainedModel`` or merge
            (``MergedModel``/``MethodMerge``: materialised with ``to_model()``, no disk round trip).
        tasks: task names (list or ``"a,b"``; lm-eval tags and wildcards work).
        include_path: folder(s) of task YAML files (default: the shipped ``recipes/tasks``).
        limit: examples per task (``int``) or fraction (``float`` < 1).
        batch_size: lm-eval batch size (``int`` or ``"auto"``).
        device: ``cpu``, ``cuda``, ``cuda:1``... (default: CPU for what is loaded here; a model
            object given stays where it is).
        tokenizer: tokenizer object or reference (default: the model's / the merge base's).
        num_fewshot: few-shot examples (default: the task's).
        split: evaluate this split instead of the task's default (test when it has one).
        dtype: model dtype (default: the checkpoint's / the merge's).
        bootstrap_iters: lm-eval bootstrap iterations for stderr of non-mean metrics (0: none).
        log_samples: keep per-example records under ``"samples"``.
        gen_kwargs: generation overrides for generate-until tasks.
        max_length: context length override.

    Returns:
        lm-eval's results dict, JSON-safe (numpy numbers → Python, callables → names), with
        ``results[task]["acc,none"]`` etc. ``None`` on ranks other than 0 of a multi-process run.

    Raises:
        TaskArithError: unknown task, unloadable model, bad include path.
    """
    acc = _distributed_accelerator(device)  # each rank builds its model on its own device
    obj, tok, label = load_model(model, tokenizer=tokenizer, device=str(acc.device) if acc else device, dtype=dtype)
    results = ModelEvaluator(obj, tok, batch_size=batch_size, max_length=max_length).run(
        tasks, include_path=include_path, limit=limit, num_fewshot=num_fewshot, split=split,
        bootstrap_iters=bootstrap_iters, log_samples=log_samples, gen_kwargs=gen_kwargs,
    )
    if results is not None:
        results["hf_taskarith"]["model"] = label
    return results


# ----------------------------------------------------------------------------------- results
def jsonable(obj: Any) -> Any:
    """A JSON-safe copy: numpy/torch numbers → Python, non-finite floats → ``None``,
    callables → ``module.name``, anything else unknown → ``str``."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    item = getattr(obj, "item", None)
    if callable(item) and getattr(obj, "ndim", 1) == 0:  # numpy / torch scalars
        try:
            return jsonable(item())
        except (TypeError, ValueError):
            pass
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        try:
            return jsonable(tolist())
        except (TypeError, ValueError):
            pass
    if callable(obj):
        return f"{getattr(obj, '__module__', '') or ''}.{getattr(obj, '__qualname__', repr(obj))}".lstrip(".")
    return str(obj)


def _metric_items(task_result: Mapping[str, Any]) -> List[Tuple[str, str, float, Any]]:
    """``[(metric, filter, value, stderr)]`` of one task's results (numeric metrics only)."""
    out = []
    for key, raw in task_result.items():
        if key in _NOT_METRICS or "_stderr" in key:
            continue
        value = jsonable(raw)  # numpy scalars → Python
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metric, _, filt = key.partition(",")
        stderr = jsonable(task_result.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr"))
        out.append((metric, filt or "none", float(value), stderr))
    return out


def primary_metric(task_result: Mapping[str, Any], metric: Optional[str] = None) -> Tuple[str, float]:
    """The metric a task is scored by: ``metric`` if given, else acc, exact_match, acc_norm… .

    Returns:
        ``(key, value)``, e.g. ``("acc,none", 0.75)``.

    Raises:
        TaskArithError: if the task has no such (numeric) metric.
    """
    items = _metric_items(task_result)
    name = task_result.get("alias") or task_result.get("name") or "task"
    if metric:
        for m, f, v, _ in items:
            if metric in (m, f"{m},{f}"):
                return f"{m},{f}", v
        raise TaskArithError(f"{name}: no metric {metric!r} (has {', '.join(sorted({m for m, *_ in items}))})")
    for wanted in PREFERRED_METRICS:
        for m, f, v, _ in items:
            if m == wanted:
                return f"{m},{f}", v
    if items:
        m, f, v, _ = items[0]
        return f"{m},{f}", v
    raise TaskArithError(f"{name}: the results carry no numeric metric")


def task_scores(results: Mapping[str, Any], tasks: Optional[Sequence[str]] = None, metric: Optional[str] = None) -> Dict[str, float]:
    """``{task: primary metric value}`` from lm-eval results (all tasks, or ``tasks``)."""
    res = results.get("results", {})
    names = list(tasks) if tasks is not None else list(res)
    out = {}
    for name in names:
        if name not in res:
            raise TaskArithError(f"results: no task {name!r} (have {', '.join(res)})")
        out[name] = primary_metric(res[name], metric)[1]
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.4f}"
    return "—" if value in (None, "") else str(value)


def results_table(results: Mapping[str, Any]) -> str:
    """A markdown table of lm-eval results: ``| task | metric | value | stderr |``."""
    rows = ["| task | metric | value | stderr |", "|---|---|---|---|"]
    for task, res in results.get("results", {}).items():
        for metric, filt, value, stderr in _metric_items(res):
            label = metric if filt == "none" else f"{metric} ({filt})"
            rows.append(f"| {res.get('alias', task)} | {label} | {value:.4f} | {_fmt(stderr)} |")
    return "\n".join(rows)


def _dataset_of(results: Mapping[str, Any], task: str) -> str:
    cfg = (results.get("configs") or {}).get(task) or {}
    path = cfg.get("dataset_path")
    if isinstance(path, str) and path and path not in _LOCAL_BUILDERS and not os.path.exists(path) and "/" in path:
        return path
    return task


def to_card_results(results: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """lm-eval results → ``[{"task", "metric", "value", "dataset"}]`` for a merge's model card.

    Set ``merge.eval_results = to_card_results(results)`` before ``save_pretrained``/``push_to_hub``
    (or use :func:`write_eval_results` on a saved folder) to get an Evaluation section and a
    ``model-index`` in the card. ``dataset`` is the task's Hub dataset when it has one, else the
    task name.
    """
    out = []
    for task, res in results.get("results", {}).items():
        for metric, filt, value, _ in _metric_items(res):
            out.append({
                "task": task,
                "metric": metric if filt == "none" else f"{metric} ({filt})",
                "value": float(value),
                "dataset": _dataset_of(results, task),
                "dataset_name": task,
            })
    return out


def attach_eval_results(merge, results: Mapping[str, Any]) -> None:
    """Give a merge object its evaluation, so its next ``save_pretrained``/``push_to_hub`` card shows it."""
    merge.eval_results = to_card_results(results)


def save_results(results: Mapping[str, Any], path: Union[str, os.PathLike]) -> Path:
    """Write results as indented JSON (atomically: temp file then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(jsonable(results), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


_MERGEABLE = ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples")


def _merge_results(old: Mapping[str, Any], new: Mapping[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(dict(old))
    for key, value in new.items():
        if key in _MERGEABLE and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = value
    return out


def _evaluation_section(card_results: Sequence[Mapping[str, Any]]) -> str:
    # Same layout as hf_taskarith.card.build_model_card.
    table = ["| task | metric | value |", "|---|---|---|"]
    table += [f"| {r['task']} | {r['metric']} | {float(r['value']):.4f} |" for r in card_results]
    return "## Evaluation\n\n" + "\n".join(table)


def write_eval_results(
    folder: Union[str, os.PathLike], results: Mapping[str, Any], *, refresh_card: bool = True, merge_existing: bool = True
) -> Path:
    """Write ``eval_results.json`` into a model folder; refresh its card if it is an hf_taskarith merge.

    Tasks already in an existing ``eval_results.json`` are kept unless re-evaluated
    (``merge_existing``). A folder we wrote (``hf_taskarith.json`` from ``save_pretrained``, or an
    adapter whose card carries the ``hf-taskarith`` tag) gets its README's Evaluation section and
    ``model-index`` updated; nothing else in the card changes.

    Returns:
        The path of ``eval_results.json``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise TaskArithError(f"{folder}: not a model folder")
    target = folder / "eval_results.json"
    data = jsonable(results)
    if merge_existing and target.is_file():
        try:
            data = _merge_results(json.loads(target.read_text()), data)
        except ValueError:
            logger.warning("%s: unreadable; replaced", target)
    save_results(data, target)
    if refresh_card and _is_our_output(folder):
        refresh_model_card(folder, to_card_results(data))
    return target


def _is_our_output(folder: Path) -> bool:
    """A folder written by hf_taskarith: a merge (``hf_taskarith.json``) or an adapter whose card we wrote."""
    if (folder / "hf_taskarith.json").is_file():
        return True
    readme = folder / "README.md"
    if not readme.is_file():
        return False
    from huggingface_hub import ModelCard

    try:
        return "hf-taskarith" in (ModelCard.load(readme).data.tags or [])
    except Exception:  # a card we cannot parse is not ours to rewrite
        return False


def refresh_model_card(folder: Union[str, os.PathLike], card_results: Sequence[Mapping[str, Any]]) -> Path:
    """Put ``card_results`` in the README of a merge folder (Evaluation section + ``model-index``)."""
    from huggingface_hub import ModelCard

    from .card import card_eval_results

    folder = Path(folder)
    readme = folder / "README.md"
    if readme.is_file():
        card = ModelCard.load(readme)
    else:
        from .card import build_model_card

        desc = json.loads((folder / "hf_taskarith.json").read_text())
        card = build_model_card(desc, base_repo_id=desc.get("base") if desc.get("base_commit") else None)
    data = card.data
    if not getattr(data, "model_name", None):
        data.model_name = folder.name
    data.eval_results = card_eval_results(card_results)
    section = _evaluation_section(card_results)
    text = card.text
    pattern = re.compile(r"^## Evaluation\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section + "\n\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    card.text = text
    card.save(readme)
    return readme


# ----------------------------------------------------------------------------------- compare
def default_task_map(tasks: Sequence[str], finetunes: Iterable[str]) -> Dict[str, str]:
    """Map each task to the finetune named like it (``count_up`` ↔ ``taskarith_count_up``)."""
    names = list(finetunes)
    out = {}
    for task in tasks:
        exact = [n for n in names if n == task]
        hits = exact or [n for n in names if task.endswith("_" + n) or task.endswith(n) or n in task]
        if len(hits) == 1:
            out[task] = hits[0]
    if not out and len(names) == len(tasks):
        out = dict(zip(tasks, names))  # same count, same order
    return out


def compare(
    base: ModelRef,
    finetunes: Mapping[str, ModelRef],
    merged: ModelRef,
    tasks: Union[str, Sequence[str]],
    *,
    task_map: Optional[Mapping[str, str]] = None,
    metric: Optional[str] = None,
    merged_label: str = "merged",
    **eval_kwargs: Any,
) -> Dict[str, Any]:
    """Evaluate the base, each finetune and the merge on the same tasks.

    Normalised accuracy (Task Arithmetic paper): ``acc_merged(task) / acc_finetune(task)`` for the
    task's own finetune, given by ``task_map`` (``{task: finetune name}``; default: names that
    match, e.g. finetune ``count_up`` for task ``taskarith_count_up``, else the same order).

    Args:
        base, merged: anything :func:`evaluate` accepts (a merge is evaluated in memory).
        finetunes: ``{name: model}``.
        tasks: task names.
        task_map: ``{task: finetune name}``.
        metric: metric to compare (default: each task's primary metric: acc, exact_match…).
        **eval_kwargs: passed to :func:`evaluate` (``limit``, ``split``, ``include_path``...).

    Returns:
        ``{"tasks", "metrics", "scores": {label: {task: value}}, "task_map", "normalized":
        {task: value|None}, "mean_normalized", "results": {label: lm-eval results}, "table"}``.
    """
    names = split_tasks(tasks)
    labels = ["base", *finetunes, merged_label]
    if len(set(labels)) != len(labels):
        raise TaskArithError(f"compare: labels must differ (got {labels})")
    tmap = dict(task_map) if task_map else default_task_map(names, finetunes)
    for task, ft in tmap.items():
        if task not in names or ft not in finetunes:
            raise TaskArithError(f"compare: task map {task}={ft} names an unknown task or finetune")
    models = {"base": base, **dict(finetunes), merged_label: merged}
    all_results: Dict[str, Any] = {}
    scores: Dict[str, Dict[str, float]] = {}
    metrics: Dict[str, str] = {}
    for label, ref in models.items():
        res = evaluate(ref, names, **eval_kwargs)
        if res is None:  # not rank 0
            return {}
        all_results[label] = res
        scores[label] = {}
        for task in names:
            key, value = primary_metric(res["results"][task], metric)
            metrics.setdefault(task, key)
            scores[label][task] = value
    normalized: Dict[str, Optional[float]] = {}
    for task in names:
        ft = tmap.get(task)
        own = scores[ft][task] if ft else None
        normalized[task] = scores[merged_label][task] / own if own else None
    defined = [v for v in normalized.values() if v is not None]
    out = {
        "tasks": names,
        "metrics": metrics,
        "scores": scores,
        "task_map": tmap,
        "normalized": normalized,
        "mean_normalized": sum(defined) / len(defined) if defined else None,
        "results": all_results,
    }
    out["table"] = compare_table(out, merged_label=merged_label)
    return out


def compare_table(cmp: Mapping[str, Any], merged_label: str = "merged") -> str:
    """Markdown: one row per task, a column per model, and the merge's normalised accuracy."""
    labels = list(cmp["scores"])
    head = "| task | metric | " + " | ".join(labels) + f" | normalised ({merged_label} / own finetune) |"
    rows = [head, "|" + "---|" * (len(labels) + 3)]
    for task in cmp["tasks"]:
        vals = " | ".join(_fmt(cmp["scores"][lab][task]) for lab in labels)
        ft = cmp["task_map"].get(task)
        norm = cmp["normalized"][task]
        norm_txt = f"{norm:.4f} (vs {ft})" if norm is not None else "—"
        rows.append(f"| {task} | {cmp['metrics'][task].split(',')[0]} | {vals} | {norm_txt} |")
    means = " | ".join(_fmt(sum(cmp["scores"][lab].values()) / len(cmp["tasks"])) for lab in labels)
    rows.append(f"| **mean** | | {means} | {_fmt(cmp['mean_normalized'])} |")
    return "\n".join(rows)
