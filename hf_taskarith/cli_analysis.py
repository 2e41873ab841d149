"""``hf-taskarith gradient``, ``analyze`` and ``trajectory``: gradient task vectors and geometry.

Registered on the main parser by ``add_analysis_commands(sub)``. Each command takes the parsed
``args`` and returns an exit code; bad input raises :class:`~hf_taskarith.errors.TaskArithError`
(the main CLI prints it on one line).

Multi-process gradient (the all-reduce sums the per-process gradients)::

    accelerate launch --multi_gpu --num_processes 8 -m hf_taskarith gradient --base org/base \\
        --data train.jsonl --lr 1e-5 --out tau --device cuda
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from .errors import TaskArithError

logger = logging.getLogger("hf_taskarith")

GRADIENT_META = "gradient_task_vector.json"


def cmd_gradient(args: argparse.Namespace) -> int:
    """τ = −η Σ_b ∇L_b(θ0) → DIR as a finetuned model θ0 + τ (default) or a stored τ folder."""
    from .gradient import compute_gradient_task_vector, process_state
    from .task_vector import BaseModel
    from .writer import check_output_dir

    if args.lr <= 0:
        raise TaskArithError(f"--lr: must be positive, got {args.lr}")
    check_output_dir(args.out, args.overwrite)  # fail before any work
    base = BaseModel(args.base)
    common = dict(
        batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, include=args.include,
        exclude=args.exclude, mixed_precision="bf16" if args.bf16 else "no", device=args.device,
        max_length=args.max_length, progress=not args.quiet,
    )
    if args.format == "vector":
        compute_gradient_task_vector(base, args.data, args.lr, save_dir=args.out, overwrite=args.overwrite, **common)
        if process_state(args.device).is_main_process:
            print(Path(args.out).resolve())
        return 0
    dtype = args.dtype or "float32"
    if dtype.lower() not in ("float32", "fp32", "float"):
        logger.warning("gradient: writing θ0 + τ in %s rounds a small τ away; float32 (default) keeps it", dtype)
    # τ goes to a scratch task-vector folder beside --out (host memory: one tensor at a time), then the
    # finetune θ0 + τ is streamed from it; the scratch folder is removed either way.
    out = Path(args.out).expanduser().resolve()
    scratch = out.parent / f".{out.name}.tau-scratch"
    state = process_state(args.device)
    try:
        tv = compute_gradient_task_vector(base, args.data, args.lr, save_dir=scratch, overwrite=True, **common)
        tv.source = None  # the scratch folder is no input to publish
        tv.display_name = f"gradient of {Path(args.data).name} (lr {args.lr:g})"
        if state.is_main_process:
            # Under a launcher the process group is accelerate's, so the engine saves from this process alone.
            saved = tv.apply_to(base).save_pretrained(
                out, dtype=dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite, progress=not args.quiet,
            )
            # Provenance beside the weights (lr, data hash, form); the folder is a normal finetune.
            (Path(saved) / GRADIENT_META).write_text(json.dumps(tv.metadata, indent=2, sort_keys=True) + "\n")
            print(saved)
        state.wait_for_everyone()
    finally:
        if state.is_main_process:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """Cosines, norms, sign conflicts and top-k overlap of task vectors → JSON, table and heatmaps."""
    from .geometry import analyze_task_vectors, open_task_vector
    from .task_vector import BaseModel, TaskVector

    refs = [(r, None) for r in args.tasks or []] + [(r, True) for r in args.adapter or []]
    if not refs:
        raise TaskArithError("analyze: give at least one task vector (TASK or --adapter)")
    base = BaseModel(args.base)
    vectors = []
    for ref, adapter in refs:
        vectors.append(TaskVector.from_adapter(ref) if adapter else open_task_vector(ref, base, exclude=args.exclude))
    names = args.name or [Path(r).name or r for r, _ in refs]
    if len(names) != len(vectors):
        raise TaskArithError(f"analyze: {len(args.name)} --name for {len(vectors)} task vectors")
    report = analyze_task_vectors(
        base, vectors, names=names, density=args.density, topk_scope=args.topk_scope, device=args.device,
        per_tensor=not args.no_per_tensor, progress=not args.quiet,
    )
    paths = report.save(args.out, overwrite=args.overwrite)
    print(report.table())
    print(f"results: {paths['json']}  table: {paths['table']}  heatmaps: {Path(args.out).resolve()}")
    return 0


def cmd_trajectory(args: argparse.Namespace) -> int:
    """Per-epoch update norms, first-epoch share of ‖τ‖ and cos(τ_1, τ_final) → JSON, table and PNG."""
    from .trajectory import analyze_trajectory, find_checkpoints

    checkpoints = find_checkpoints(args.checkpoints)
    report = analyze_trajectory(args.base, checkpoints, exclude=args.exclude, device=args.device,
                                per_tensor=not args.no_per_tensor, progress=not args.quiet)
    paths = report.save(args.out, overwrite=args.overwrite)
    print(report.table())
    print(f"results: {paths['json']}  table: {paths['table']}  plot: {paths['plot']}")
    return 0


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def add_analysis_commands(subparsers) -> None:
    """Register ``gradient``, ``analyze`` and ``trajectory`` on the main CLI's subparsers."""
    p = subparsers.add_parser(
        "gradient",
        help="gradient task vector τ = −η Σ_b ∇L_b(θ0) from a JSONL dataset (no training)",
        description="Compute τ = −η Σ_b ∇L_b(θ0), every gradient at the base (arXiv:2508.16082). Without "
        "--batch-size it is one full-batch GD step: τ = −η ∇L(θ0) with L the token-mean causal-LM loss over "
        "all data. Data: JSONL with 'text' (all tokens scored) or 'prompt'+'completion' (completion scored). "
        "Runs under accelerate launch / torchrun (gradients are all-reduced).",
    )
    p.add_argument("--base", required=True, help="base model: local folder, org/name or org/name@revision")
    p.add_argument("--data", required=True, help="JSONL training data")
    p.add_argument("--lr", required=True, type=float, help="learning rate η")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", choices=["model", "vector"], default="model",
                   help="model (default): the finetune θ0+τ in HF layout, usable by apply --task / merge / eval / push; "
                   "vector: τ itself, fp32 task_vector.safetensors + task_vector.json (analyze, Python API)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="examples per step across processes (sum form over batches; default: one full batch)")
    p.add_argument("--micro-batch-size", type=_positive_int, default=8,
                   help="examples per forward/backward on one process (gradient accumulation; default 8)")
    p.add_argument("--include", action="append", metavar="REGEX", help="only parameters matching (re.search) get τ")
    p.add_argument("--exclude", action="append", metavar="REGEX", help="parameters kept out of τ")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast forward (fp32 weights and gradient sums)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the Accelerate process's device)")
    p.add_argument("--max-length", type=_positive_int, default=None, help="truncate examples to N tokens")
    p.add_argument("--dtype", default=None, help="--format model: output dtype (default float32: keeps a small τ)")
    p.add_argument("--max-shard-size", default="5GB", help="--format model: shard size (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=cmd_gradient)

    p = subparsers.add_parser(
        "analyze",
        help="task-vector geometry: norms, cosine matrix, sign conflicts, top-k overlap (streaming)",
        description="Pairwise cosines, norms, sign-conflict rates and top-k mask overlap of task vectors, per tensor, "
        "per layer and overall, one tensor at a time. TASK is a full finetune, a PEFT adapter folder or a stored "
        "task-vector folder (detected); --adapter forces adapter reading (Hub adapters). Writes geometry.json, "
        "geometry.md and heatmap PNGs.",
    )
    p.add_argument("tasks", nargs="*", metavar="TASK", help="task vector: finetune, adapter folder or task-vector folder")
    p.add_argument("--base", required=True, help="base model reference")
    p.add_argument("--adapter", action="append", metavar="REF", help="PEFT LoRA adapter (repeat)")
    p.add_argument("--name", action="append", metavar="NAME", help="display names, in order (TASKs then adapters)")
    p.add_argument("--density", type=float, default=0.2, help="top-k density for mask overlap (default 0.2)")
    p.add_argument("--topk-scope", choices=["tensor", "global"], default="tensor",
                   help="tensor: per-tensor top-k, unioned (default); global: exact whole-model top-k (2 extra passes)")
    p.add_argument("--exclude", action="append", metavar="REGEX", help="keep matching tensors out of dense τ")
    p.add_argument("--device", default=None, help="where the math runs: cpu (default) or cuda")
    p.add_argument("--no-per-tensor", action="store_true", help="leave per-tensor entries out of the JSON")
    p.add_argument("--out", default="geometry", help="output folder (default geometry)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=cmd_analyze)

    p = subparsers.add_parser(
        "trajectory",
        help="per-epoch update norms, first-epoch share of ‖τ‖ and cos(τ_1, τ_final) from checkpoints",
        description="Analyse a finetuning run: a Trainer output folder (checkpoint-N subfolders, sorted by N) or "
        "checkpoints listed in training order. Writes trajectory.json, trajectory.md and trajectory.png.",
    )
    p.add_argument("checkpoints", nargs="+", metavar="RUN_DIR_OR_CHECKPOINT", help="run folder, or checkpoints in order")
    p.add_argument("--base", required=True, help="base model θ0")
    p.add_argument("--exclude", action="append", metavar="REGEX", help="keep matching tensors out of dense τ")
    p.add_argument("--device", default=None, help="where the math runs: cpu (default) or cuda")
    p.add_argument("--no-per-tensor", action="store_true", help="leave per-tensor entries out of the JSON")
    p.add_argument("--out", default="trajectory", help="output folder (default trajectory)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=cmd_trajectory)
