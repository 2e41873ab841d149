"""``hf-taskarith <subcommand>``: a thin layer over the Python API.

Bad input exits non-zero with a one-line error; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .errors import TaskArithError

logger = logging.getLogger("hf_taskarith")


def parse_weighted(value: str) -> Tuple[str, float]:
    """``REF[:WEIGHT]`` → ``(ref, weight)``; the weight may be negative (negation)."""
    ref, sep, weight = value.rpartition(":")
    if sep:
        try:
            return ref, float(weight)
        except ValueError:
            pass
    return value, 1.0


def _cmd_apply(args: argparse.Namespace) -> int:
    from .distributed import env_rank, shutdown
    from .task_vector import BaseModel, TaskVector

    if not args.task and not args.adapter:
        raise TaskArithError("apply: give at least one --task or --adapter")
    base = BaseModel(args.base)
    vectors = []
    for spec in args.task or []:
        ref, weight = parse_weighted(spec)
        vectors.append(weight * TaskVector.from_models(base, ref, exclude=args.exclude))
    for spec in args.adapter or []:
        ref, weight = parse_weighted(spec)
        vectors.append(weight * TaskVector.from_adapter(ref))
    merged = sum(vectors).apply_to(base, scaling_coef=args.scaling)
    try:
        out = merged.save_pretrained(
            args.out,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            device=args.device,
            tokenizer_source=args.tokenizer_from,
            progress=not args.quiet,
        )
    finally:
        shutdown()  # under torchrun / accelerate launch: leave the process group cleanly
    if env_rank() == 0:
        print(out)
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from .distributed import env_rank, shutdown
    from .method_merge import run_recipe
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe)
    try:
        out = run_recipe(recipe, args.out, overwrite=args.overwrite, device=args.device, progress=not args.quiet)
    finally:
        shutdown()
    if env_rank() == 0:
        print(out)
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe)
    print(f"{args.recipe}: valid {recipe.source_format} recipe, method {recipe.method}, {len(recipe.tasks)} task(s)")
    if args.resolve:
        from .validate import resolve_check

        for line in resolve_check(recipe):
            print("  " + line)
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_folder

    url = push_folder(
        args.folder, args.repo_id, private=True if args.private else None, revision=args.revision,
        create_pr=args.create_pr, commit_message=args.commit_message,
    )
    print(url)
    return 0


def _cmd_extract_lora(args: argparse.Namespace) -> int:
    from .engine import parse_dtype
    from .extract_lora import extract_lora

    out = extract_lora(
        args.base, args.model, args.out, rank=args.rank, energy=args.energy,
        include_embeddings=args.embeddings, dtype=parse_dtype(args.dtype), overwrite=args.overwrite,
    )
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-taskarith", description="Model merging by task arithmetic.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "apply",
        help="θ = base + λ·Σ w_i τ_i from full finetunes and PEFT LoRA adapters",
        description="Apply task vectors to a base model and save the result (streaming, atomic).",
    )
    p.add_argument("--base", required=True, help="base model: local folder, org/name or org/name@revision")
    p.add_argument("--task", action="append", metavar="REF[:WEIGHT]", help="full finetune; weight may be negative")
    p.add_argument("--adapter", action="append", metavar="REF[:WEIGHT]", help="PEFT LoRA adapter; weight may be negative")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--scaling", "--lambda", type=float, default=1.0, help="λ, multiplies the whole sum (default 1)")
    p.add_argument("--dtype", default=None, help="output dtype: bfloat16, float16 or float32 (default: the base's)")
    p.add_argument("--device", default=None, help="where the math runs: cpu (default) or cuda")
    p.add_argument("--max-shard-size", default="5GB", help="shard size (default 5GB)")
    p.add_argument("--exclude", action="append", metavar="REGEX", help="keep matching tensors out of dense τ")
    p.add_argument("--tokenizer-from", default=None, help="copy tokenizer files from this model instead of the base")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=_cmd_apply)

    p = sub.add_parser("merge", help="run a YAML merge recipe (native or mergekit)")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default=None, help="where the math runs: cpu (default) or cuda")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("validate", help="check a recipe's schema (and with --resolve, its inputs)")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("--resolve", action="store_true", help="also check inputs exist and shapes agree (headers only)")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("push", help="upload a merged model or adapter folder to the Hub in one commit")
    p.add_argument("folder", help="output folder of a merge")
    p.add_argument("repo_id", help="namespace/name (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", default=None, help="branch to commit to")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead")
    p.add_argument("--commit-message", default=None, help="commit summary")
    p.set_defaults(func=_cmd_push)

    p = sub.add_parser("extract-lora", help="turn a full finetune into a PEFT LoRA adapter (truncated SVD per module)")
    p.add_argument("--base", required=True, help="base model reference")
    p.add_argument("--model", required=True, help="full finetune reference")
    p.add_argument("--rank", type=int, default=None, help="rank per module (default 16 unless --energy)")
    p.add_argument("--energy", type=float, default=None, help="per-module rank keeping this fraction of Σ S² (rank_pattern)")
    p.add_argument("--embeddings", action="store_true", help="also factor embedding matrices")
    p.add_argument("--dtype", default=None, help="adapter dtype (default float32)")
    p.add_argument("--out", required=True, help="output adapter folder")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=_cmd_extract_lora)

    from .cli_eval import add_eval_commands

    add_eval_commands(sub)
    from .cli_analysis import add_analysis_commands

    add_analysis_commands(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is _cmd_extract_lora and args.rank is None and args.energy is None:
        args.rank = 16
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except TaskArithError as err:
        if args.debug:
            raise
        print(f"hf-taskarith {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError) as err:
        if args.debug:
            raise
        print(f"hf-taskarith {args.command}: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
