"""The benchmark harness's own logic (tests/bench): document merging, exactness checks, inputs.

The benchmarks themselves run with ``make bench``; these tests only guard the pieces whose mistakes
would silently publish wrong numbers.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent / "bench"
sys.path.insert(0, str(BENCH))

import adapter_bench  # noqa: E402
import run_bench  # noqa: E402
import topk_bench  # noqa: E402


def test_merge_document_replaces_only_the_sections_run():
    old = (
        "# old header\n\n<!-- section:floor -->\nOLD FLOOR\n<!-- /section:floor -->\n\n"
        "<!-- section:apply -->\nOLD APPLY\n<!-- /section:apply -->\n\n"
        "<!-- section:retired -->\nKEEP ME\n<!-- /section:retired -->\n"
    )
    new = {"apply": "<!-- section:apply -->\nNEW APPLY\n<!-- /section:apply -->"}
    doc = run_bench.merge_document(old, new, "# new header")
    assert doc.startswith("# new header\n")
    assert "OLD FLOOR" in doc and "NEW APPLY" in doc and "OLD APPLY" not in doc and "KEEP ME" in doc
    # registry order first (floor before apply), unknown sections after
    assert doc.index("OLD FLOOR") < doc.index("NEW APPLY") < doc.index("KEEP ME")


def test_topk_candidates_are_exact_on_the_bracket_path():
    # n > 4·2^18 so that methods._kth_largest takes its sampled-bracket path, not plain kthvalue
    res = topk_bench.run(1100, 1000, 0.2, repeats=1)
    for label, r in res["inputs"].items():
        assert r["n"] == 1_100_000 and r["k"] == 220_000
        assert all(r["exact"].values()), (label, r["exact"])
        assert r["topk_mask_exact"], label
    assert res["inputs"]["bf16 finetune − bf16 base (ties)"]["tied_at_threshold"] > 1


def test_radix_select_matches_kthvalue_by_hand():
    a = torch.tensor([0.5, 3.0, 1.0, 3.0, 2.0, 0.0])
    assert float(topk_bench.by_radix(a, 1)) == 3.0
    assert float(topk_bench.by_radix(a, 2)) == 3.0
    assert float(topk_bench.by_radix(a, 3)) == 2.0
    assert float(topk_bench.by_radix(a, 6)) == 0.0


def test_sparse_base_checkpoint_is_valid_safetensors(tmp_path):
    from safetensors import safe_open

    shapes = {"a.weight": (3, 5), "b.weight": (7,)}
    path = tmp_path / "model.safetensors"
    adapter_bench.write_sparse_safetensors(path, shapes)
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["a.weight", "b.weight"]
        assert tuple(f.get_tensor("a.weight").shape) == (3, 5)
        assert f.get_tensor("b.weight").dtype == torch.bfloat16
        assert not f.get_tensor("a.weight").any()


def test_adapter_errors_match_dense_svd(tmp_path, monkeypatch):
    """The error reference (svdvals of ΔW·Q) equals a plain dense SVD of ΔW; a merge equal to the
    dense truncated SVD has the best error, a worse one a larger error."""
    from safetensors.torch import save_file

    monkeypatch.setattr(adapter_bench, "MODULES", {"self_attn.q_proj": (48, 40), "mlp.down_proj": (40, 72)})
    monkeypatch.setattr(adapter_bench, "HIDDEN", 40)
    monkeypatch.setattr(adapter_bench, "INTER", 72)
    root = tmp_path / "in"
    for k, alpha in enumerate(adapter_bench.ALPHAS, 1):  # adapters only (errors() reads no base)
        ad = root / f"ad{k}"
        ad.mkdir(parents=True)
        t = {}
        for mod, (o, i) in adapter_bench.MODULES.items():
            key = f"{adapter_bench.PREFIX}model.layers.0.{mod}"
            t[key + ".lora_A.weight"] = torch.randn(adapter_bench.RANK, i, generator=adapter_bench._gen(k, mod + "A"))
            t[key + ".lora_B.weight"] = torch.randn(o, adapter_bench.RANK, generator=adapter_bench._gen(k, mod + "B"))
        save_file(t, str(ad / "adapter_model.safetensors"))
    best, worse = tmp_path / "best", tmp_path / "worse"
    tb, tw = {}, {}
    dense = {}
    for mod, (o, i) in adapter_bench.MODULES.items():
        key = f"{adapter_bench.PREFIX}model.layers.0.{mod}"
        d = torch.zeros(o, i, dtype=torch.float64)
        for k, (alpha, w) in enumerate(zip(adapter_bench.ALPHAS, adapter_bench.WEIGHTS), 1):
            from safetensors.torch import load_file

            f = load_file(str(root / f"ad{k}" / "adapter_model.safetensors"))
            d += (w * alpha / adapter_bench.RANK) * (f[key + ".lora_B.weight"].double() @ f[key + ".lora_A.weight"].double())
        dense[mod] = d
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        r = adapter_bench.RANK
        tb[key + ".lora_B.weight"] = (u[:, :r] * s[:r]).float().contiguous()
        tb[key + ".lora_A.weight"] = vh[:r].float().contiguous()
        tw[key + ".lora_B.weight"] = (u[:, 1 : r + 1] * s[1 : r + 1]).float().contiguous()  # skips the top triplet
        tw[key + ".lora_A.weight"] = vh[1 : r + 1].float().contiguous()
    for folder, t in ((best, tb), (worse, tw)):
        folder.mkdir()
        save_file(t, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({"r": 16, "lora_alpha": 16}))
    res = adapter_bench.errors(root, best, worse, 0)
    for row in res["modules"]:
        s = torch.linalg.svdvals(dense[row["module"]])
        assert row["best"] == pytest.approx(float(s[adapter_bench.RANK :].norm()), rel=1e-6)
        assert row["peft"] == pytest.approx(row["best"], rel=1e-5)  # "peft" slot holds the optimal merge
        assert row["ours"] > row["best"] * 1.01  # the "ours" slot holds the worse one
