"""Multi-process merges: 2 CPU ranks (gloo) under torchrun write the same bytes as one process.

Each launch starts two Python processes, so the file groups several merges per launch (a small
driver script) and launches torchrun three times in all: the driver, the CLI (`-m hf_taskarith
apply` with a LoRA) and a run whose rank 1 fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hf_taskarith.distributed import DistContext, assign_shards, get_context, split_names
from hf_taskarith.method_merge import run_recipe
from hf_taskarith.recipe import load_recipe

SHARD = "20KB"  # the tiny llama (~100 KB of weights) then makes 7 shards


def _torchrun(args, tmp_path: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def _write_recipe(path: Path, **data) -> Path:
    data.setdefault("output", {"max_shard_size": SHARD})
    path.write_text(yaml.safe_dump(data))
    return path


def _assert_same_files(a: Path, b: Path) -> None:
    names_a = sorted(p.name for p in a.iterdir())
    assert names_a == sorted(p.name for p in b.iterdir())
    for name in names_a:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _recipes(zoo, folder: Path):
    base, fa, fb = str(zoo["llama_base"]), str(zoo["llama_ft_a"]), str(zoo["llama_ft_b"])
    two = [{"model": fa, "weight": 0.5}, {"model": fb, "weight": 0.3}]
    return {
        "ta": _write_recipe(folder / "ta.yaml", base=base, method="task_arithmetic", tasks=two, dtype="float32"),
        "ties": _write_recipe(folder / "ties.yaml", base=base, method="ties", parameters={"density": 0.5},
                              tasks=[{"model": fa, "weight": 0.7}, {"model": str(zoo["llama_ft_c"]), "weight": 0.4}]),
        "ties_global": _write_recipe(folder / "ties_global.yaml", base=base, method="ties", topk_scope="global",
                                     parameters={"density": 0.3}, tasks=two),
        "dare_ties": _write_recipe(folder / "dare_ties.yaml", base=base, method="dare_ties", seed=11,
                                   parameters={"density": 0.5}, tasks=two),
        "lora_adapter": _write_recipe(folder / "lora_adapter.yaml", base=base, method="task_arithmetic",
                                      tasks=[{"adapter": str(zoo["lora_plain"]), "weight": 0.5},
                                             {"adapter": str(zoo["lora_b"]), "weight": 0.5}],
                                      output={"format": "adapter"}),
    }


_DRIVER = textwrap.dedent(
    """
    import sys, logging
    from hf_taskarith.distributed import shutdown
    from hf_taskarith.method_merge import run_recipe
    from hf_taskarith.recipe import load_recipe

    logging.basicConfig(level=logging.INFO)
    for pair in sys.argv[1:]:
        recipe, out = pair.split("=")
        run_recipe(load_recipe(recipe), out, progress=False)
    shutdown()
    """
)


def test_two_ranks_write_the_single_process_bytes(zoo, tmp_path):
    recipes = _recipes(zoo, tmp_path)
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    pairs = [f"{r}={tmp_path / ('multi_' + key)}" for key, r in recipes.items()]
    proc = _torchrun([str(driver), *pairs], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Both ranks really wrote shards (7 shards over 2 ranks: neither idles).
    counts = {int(r): int(n) for r, n in re.findall(r"rank (\d) writes (\d+) of 7 shard", proc.stderr)}
    assert len(counts) == 2 and min(counts.values()) > 0 and sum(counts.values()) == 7, counts
    for key, r in recipes.items():
        single = run_recipe(load_recipe(r), tmp_path / f"single_{key}", progress=False)
        if key != "lora_adapter":
            assert len(list(single.glob("model-*-of-00007.safetensors"))) == 7
        _assert_same_files(single, tmp_path / f"multi_{key}")
    # And the bytes are the right ones, from the formula (not only equal to our own single run).
    got = {}
    for f in (tmp_path / "multi_ta").glob("*.safetensors"):
        got.update(load_file(f))
    base, fa, fb = (load_file(Path(zoo[m]) / "model.safetensors") for m in ("llama_base", "llama_ft_a", "llama_ft_b"))
    for k, v in base.items():
        want = v.float() + 0.5 * (fa[k].float() - v.float()) + 0.3 * (fb[k].float() - v.float())
        torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-7, msg=k)
    assert not list(tmp_path.glob(".multi_*")), "temp folders left behind"


_FAILING = textwrap.dedent(
    """
    import os, sys
    from hf_taskarith import method_merge
    from hf_taskarith.cli import main

    real = method_merge.MethodMerge.compute

    def compute(self, name, base):
        if os.environ["RANK"] == "1":
            raise OSError(f"disk error while reading {name}")
        return real(self, name, base)

    method_merge.MethodMerge.compute = compute
    sys.exit(main(sys.argv[1:]))
    """
)


def test_a_failing_rank_leaves_no_output(zoo, tmp_path):
    r = _write_recipe(
        tmp_path / "ties.yaml", base=str(zoo["llama_base"]), method="ties", parameters={"density": 0.5},
        tasks=[{"model": str(zoo["llama_ft_a"])}, {"model": str(zoo["llama_ft_b"])}],
    )
    script = tmp_path / "failing.py"
    script.write_text(_FAILING)
    out = tmp_path / "out"
    proc = _torchrun([str(script), "-q", "merge", str(r), "--out", str(out)], tmp_path)
    assert proc.returncode != 0
    assert "disk error while reading" in proc.stderr  # rank 1's own error
    assert "failed on another rank" in proc.stderr  # rank 0 stops too, with a clear reason
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temp folder left behind"


def test_shard_assignment_is_balanced_and_complete():
    sizes = [100, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 40]
    owned = assign_shards(sizes, 2)
    assert sorted(i for o in owned for i in o) == list(range(len(sizes)))
    loads = [sum(sizes[i] for i in o) for o in owned]
    assert loads == [120, 120]  # largest first to the least-loaded rank: 100 | 40 + 6·10, then alternate
    assert assign_shards([5, 5, 5, 5], 2) == [[0, 2], [1, 3]]  # equal shards go round-robin
    assert assign_shards([5], 3) == [[0], [], []]  # one shard: the other ranks idle
    assert split_names(list("abcde"), 1, 2) == ["b", "d"]


def test_a_single_process_sets_up_nothing(zoo, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = get_context(torch.device("cpu"))
    assert isinstance(ctx, DistContext) and not ctx.distributed and ctx.is_main
    assert ctx.any_true(True) and not ctx.any_true(False)
    assert ctx.on_main(lambda: 3) == 3
    r = _write_recipe(tmp_path / "r.yaml", base=str(zoo["llama_base"]), method="task_arithmetic",
                      tasks=[{"model": str(zoo["llama_ft_a"])}])
    run_recipe(load_recipe(r), tmp_path / "out", progress=False)
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())


def test_cli_apply_with_a_lora_under_torchrun_matches_one_process(zoo, tmp_path):
    args = ["--base", str(zoo["llama_base"]), "--task", f"{zoo['llama_ft_a']}:0.5",
            "--adapter", f"{zoo['lora_plain']}:0.7", "--max-shard-size", SHARD]
    proc = _torchrun(["-m", "hf_taskarith", "-q", "apply", *args, "--out", str(tmp_path / "multi")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str((tmp_path / "multi").resolve())  # printed once, by rank 0
    from hf_taskarith.cli import main

    assert main(["-q", "apply", *args, "--out", str(tmp_path / "single")]) == 0
    assert len(list((tmp_path / "single").glob("model-*.safetensors"))) >= 3
    _assert_same_files(tmp_path / "single", tmp_path / "multi")
