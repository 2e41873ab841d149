"""Task-vector geometry and trajectory analysis against hand-computed values.

The constructed task vectors below are small enough to do on paper; every expected number in the
tests is derived in the comments from the listed coordinates, never from our output.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_taskarith.geometry as geometry
from hf_taskarith import (
    CheckpointError,
    IncompatibleTensorsError,
    PairwiseStats,
    StoredTaskVector,
    TaskArithError,
    TaskVector,
    analyze_task_vectors,
    analyze_trajectory,
    find_checkpoints,
)
from hf_taskarith.cli import main as cli_main

NAMES = ["model.layers.0.w", "model.layers.1.w", "lm_head.weight"]
# Flattened over (layers.0 | layers.1 | head), 10 coordinates:
#   A = [1,-2, 0, 3 | 0, 1, 1, 0 |  2, 0]
#   B = [1, 2, 1,-3 | 0,-1, 2, 0 | -2, 1]
#   C = [0, 0, 0, 1 | 1, 0, 0, 0 |  0, 0]
TAUS = {
    "A": [[1, -2, 0, 3], [0, 1, 1, 0], [2, 0]],
    "B": [[1, 2, 1, -3], [0, -1, 2, 0], [-2, 1]],
    "C": [[0, 0, 0, 1], [1, 0, 0, 0], [0, 0]],
}
BASE = [[0.5, -1.0, 2.0, 0.25], [1.0, 1.0, -1.0, 0.0], [3.0, -2.0]]


def _save_model(folder: Path, values) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({n: torch.tensor(v, dtype=torch.float32) for n, v in zip(NAMES, values)}, str(folder / "model.safetensors"))
    return folder


@pytest.fixture()
def tiny(tmp_path):
    """A base folder and, per task, a full-finetune folder θ0 + τ (all values exact in fp32)."""
    base = _save_model(tmp_path / "base", BASE)
    fts = {k: _save_model(tmp_path / f"ft_{k}", [[b + t for b, t in zip(bs, ts)] for bs, ts in zip(BASE, tau)])
           for k, tau in TAUS.items()}
    return base, fts


def _stored(key: str) -> StoredTaskVector:
    return StoredTaskVector.from_tensors({n: torch.tensor(v, dtype=torch.float32) for n, v in zip(NAMES, TAUS[key])})


# ----------------------------------------------------------------- pure accumulators
def test_pairwise_stats_by_hand(monkeypatch):
    monkeypatch.setattr(geometry, "_CHUNK", 3)  # blocks cut across coordinates: accumulation must not care
    flat = torch.tensor([sum(TAUS[k], []) for k in "ABC"], dtype=torch.float32)
    s = PairwiseStats.zeros(3).update(flat)
    # ‖A‖² = 1+4+9+1+1+4 = 20, ‖B‖² = 1+4+1+9+1+4+4+1 = 25, ‖C‖² = 2
    assert s.norms() == pytest.approx([math.sqrt(20), 5.0, math.sqrt(2)])
    # A·B = 1−4−9−1+2−4 = −15, A·C = 3, B·C = −3
    cos = s.cosine()
    assert cos[0][1] == pytest.approx(-15 / math.sqrt(500)) and cos[1][0] == cos[0][1]
    assert cos[0][2] == pytest.approx(3 / math.sqrt(40)) and cos[1][2] == pytest.approx(-3 / math.sqrt(50))
    assert cos[0][0] == pytest.approx(1.0)
    # A,B both nonzero at coords 0,1,3,5,6,8; signs differ at 1,3,5,8 → 4/6.
    # A,C both nonzero only at 3 (3 vs 1, same sign) → 0; B,C only at 3 (−3 vs 1) → 1.
    rate = s.sign_conflict_rate()
    assert rate[0][1] == pytest.approx(4 / 6) and rate[0][2] == 0.0 and rate[1][2] == 1.0 and rate[0][0] == 0.0
    assert s.both_nonzero.tolist()[0][1] == 6
    # ≥ 2 nonzero at coords 0,1,3,5,6,8 (6); mixed signs at 1,3 (3,−3,1),5,8 (4) → 4/6
    assert s.multi_sign_conflict_rate() == pytest.approx(4 / 6)
    assert s.numel == 10


def test_pairwise_stats_masks_and_zero_vectors():
    d = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    m = torch.tensor([[True, False, True, False], [True, True, False, False]])
    s = PairwiseStats.zeros(2).update(d, m)
    assert s.cosine()[0][1] is None  # a zero vector has no direction
    assert s.sign_conflict_rate()[0][1] is None  # no coordinate nonzero in both
    assert s.mask_count.tolist() == [2, 2]
    assert s.topk_overlap()[0][1] == 0.5 and s.topk_jaccard()[0][1] == pytest.approx(1 / 3)
    total = s + PairwiseStats.zeros(2).update(d, m)
    assert total.mask_inter.tolist() == [[4, 2], [2, 4]] and total.numel == 8
    with pytest.raises(TaskArithError, match="expected 2 task vectors"):
        s.update(torch.zeros(3, 4))


# ----------------------------------------------------------------- streaming analysis
def test_analyze_matches_hand_values_per_layer_and_overall(tiny):
    base, fts = tiny
    # Mixed inputs: A and B as full finetunes (θ − θ0 read from folders), C as an in-memory τ.
    vectors = {"A": TaskVector.from_models(base, fts["A"]), "B": TaskVector.from_models(base, fts["B"]), "C": _stored("C")}
    r = analyze_task_vectors(base, vectors, density=0.5)
    assert r.names == ["A", "B", "C"]
    assert r.overall.cosine()[0][1] == pytest.approx(-15 / math.sqrt(500))
    assert r.overall.sign_conflict_rate()[1][2] == 1.0
    assert set(r.per_layer) == {"model.layers.0", "model.layers.1", "lm_head.weight"}
    # layers.1: A=[0,1,1,0], B=[0,−1,2,0]: A·B = −1+2 = 1, ‖A‖=√2, ‖B‖=√5; one conflict of two shared coords.
    l1 = r.per_layer["model.layers.1"]
    assert l1.cosine()[0][1] == pytest.approx(1 / math.sqrt(10))
    assert l1.sign_conflict_rate()[0][1] == 0.5
    # Per-tensor top-k at density 0.5: k = 2, 2, 1 (ties broken to the lower index):
    #   layers.0: A {1,3}, B {1,3}, C {3,0};  layers.1: A {1,2}, B {1,2}, C {0,1};  head: A {0}, B {0}, C {0}
    #   A∩B = 2+2+1 = 5 of 5 → 1.0;  A∩C = 1+1+1 = 3 → overlap 3/5, Jaccard 3/7
    ov, jac = r.overall.topk_overlap(), r.overall.topk_jaccard()
    assert ov[0][1] == 1.0 and ov[0][2] == pytest.approx(0.6) and jac[0][2] == pytest.approx(3 / 7)
    assert r.per_layer["model.layers.0"].topk_overlap()[0][2] == 0.5
    assert r.per_tensor["lm_head.weight"].mask_count.tolist() == [1, 1, 1]


def test_analyze_global_topk(tiny):
    base, _ = tiny
    r = analyze_task_vectors(base, [_stored("A"), _stored("B")], names=["A", "B"], density=0.3, topk_scope="global")
    # k = int(0.3·10) = 3. |A| sorted 3,2,2,… → t=2 → {1,3,8}; |B| sorted 3,2,2,2,… → t=2 → {1,3,6,8} (ties kept)
    assert r.overall.mask_count.tolist() == [3, 4]
    assert r.overall.topk_overlap()[0][1] == 1.0 and r.overall.topk_jaccard()[0][1] == 0.75


def test_analyze_refuses_mismatched_shapes(tiny, tmp_path):
    base, fts = tiny
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({"model.layers.0.w": torch.zeros(5), "model.layers.1.w": torch.zeros(4), "lm_head.weight": torch.zeros(2)},
              str(bad / "model.safetensors"))
    with pytest.raises(IncompatibleTensorsError, match=r"model\.layers\.0\.w.*\[5\] vs \[4\]"):
        analyze_task_vectors(base, [TaskVector.from_models(base, fts["A"]), TaskVector.from_models(base, bad)])
    with pytest.raises(TaskArithError, match="density"):
        analyze_task_vectors(base, [_stored("A")], density=0)


def test_cli_analyze_writes_json_and_heatmaps(zoo, tmp_path):
    base, a, b = zoo["llama_base"], zoo["llama_ft_a"], zoo["llama_ft_b"]
    out = tmp_path / "geo"
    assert cli_main(["-q", "analyze", "--base", str(base), str(a), str(b), "--adapter", str(zoo["lora_plain"]),
                     "--out", str(out), "--density", "0.1"]) == 0
    data = json.loads((out / "geometry.json").read_text())
    assert data["task_vectors"] == ["llama_ft_a", "llama_ft_b", "lora_plain"]
    for png in ("cosine.png", "sign_conflict.png", "topk_overlap.png", "per_layer_cosine.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    # Independent check of the overall cosine of the two finetunes: whole flattened vectors via safetensors.
    t0, ta, tb = (load_file(Path(p) / "model.safetensors") for p in (base, a, b))
    va = torch.cat([(ta[n].double() - t0[n].double()).reshape(-1) for n in sorted(t0)])
    vb = torch.cat([(tb[n].double() - t0[n].double()).reshape(-1) for n in sorted(t0)])
    want = float(va @ vb / (va.norm() * vb.norm()))
    assert data["overall"]["cosine"][0][1] == pytest.approx(want, rel=1e-6)
    assert data["overall"]["norms"][0] == pytest.approx(float(va.norm()), rel=1e-6)
    assert "model.layers.0" in data["per_layer"] and (out / "geometry.md").is_file()


# ----------------------------------------------------------------- trajectory
def _trajectory_run(tmp_path) -> Path:
    """θ0 = BASE; τ_e per checkpoint (exact in fp32):
        layers.0: τ1=[1,0,0,0], τ2=[1,1,0,0], τ3=[2,1,0,0]   (steps of norm 1, 1, 1)
        layers.1: τ1=τ2=τ3=[0,0,3,4]                        (all movement in the first epoch)
        lm_head : τ_e = 0
    Saved as checkpoint-2, checkpoint-10, checkpoint-30 (numeric, not lexicographic, order)."""
    run = tmp_path / "run"
    l0 = [[1, 0, 0, 0], [1, 1, 0, 0], [2, 1, 0, 0]]
    for step, tau0 in zip((2, 10, 30), l0):
        tau = [tau0, [0, 0, 3, 4], [0, 0]]
        _save_model(run / f"checkpoint-{step}", [[b + t for b, t in zip(bs, ts)] for bs, ts in zip(BASE, tau)])
    (run / "runs").mkdir()  # Trainer's logging folder is not a checkpoint
    return run


def test_trajectory_by_hand(tmp_path):
    base = _save_model(tmp_path / "base", BASE)
    run = _trajectory_run(tmp_path)
    ckpts = find_checkpoints([run])
    assert [c.name for c in ckpts] == ["checkpoint-2", "checkpoint-10", "checkpoint-30"]
    r = analyze_trajectory(base, ckpts)
    l0, l1 = r.per_layer["model.layers.0"], r.per_layer["model.layers.1"]
    assert l0.update_norms() == pytest.approx([1.0, 1.0, 1.0])
    assert l0.first_share() == pytest.approx(1 / math.sqrt(5)) and l0.cos_to_final()[0] == pytest.approx(2 / math.sqrt(5))
    assert l1.update_norms() == pytest.approx([5.0, 0.0, 0.0]) and l1.first_share() == 1.0
    # overall: steps √(1+25), 1, 1; ‖τ1‖² = 26, ‖τ3‖² = 5 + 25 = 30, τ1·τ3 = 2 + 25 = 27
    o = r.overall
    assert o.update_norms() == pytest.approx([math.sqrt(26), 1.0, 1.0])
    assert o.first_share() == pytest.approx(math.sqrt(26 / 30))
    assert o.cos_to_final()[0] == pytest.approx(27 / math.sqrt(26 * 30)) and o.cos_to_final()[2] == pytest.approx(1.0)
    assert r.per_layer["lm_head.weight"].first_share() is None  # τ = 0: no share to report


def test_cli_trajectory_writes_table_and_png(tmp_path):
    base = _save_model(tmp_path / "base", BASE)
    run = _trajectory_run(tmp_path)
    out = tmp_path / "traj"
    assert cli_main(["-q", "trajectory", "--base", str(base), str(run), "--out", str(out)]) == 0
    data = json.loads((out / "trajectory.json").read_text())
    assert data["checkpoints"] == ["checkpoint-2", "checkpoint-10", "checkpoint-30"]
    assert data["overall"]["first_epoch_share"] == pytest.approx(math.sqrt(26 / 30))
    assert (out / "trajectory.png").read_bytes()[:4] == b"\x89PNG"
    assert "checkpoint-10" in (out / "trajectory.md").read_text()
    # explicit list, in the given order
    out2 = tmp_path / "traj2"
    assert cli_main(["-q", "trajectory", "--base", str(base), str(run / "checkpoint-30"), str(run / "checkpoint-2"),
                     "--out", str(out2)]) == 0
    assert json.loads((out2 / "trajectory.json").read_text())["checkpoints"] == ["checkpoint-30", "checkpoint-2"]


def test_trajectory_errors(tmp_path, capsys):
    base = _save_model(tmp_path / "base", BASE)
    with pytest.raises(CheckpointError, match="nope: checkpoint folder not found"):
        find_checkpoints([tmp_path / "nope"])
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint-N subfolders and no weights"):
        find_checkpoints([tmp_path / "empty_run"])
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({"model.layers.0.w": torch.zeros(2, 2), "model.layers.1.w": torch.zeros(4), "lm_head.weight": torch.zeros(2)},
              str(bad / "model.safetensors"))
    with pytest.raises(IncompatibleTensorsError, match=r"model\.layers\.0\.w"):
        analyze_trajectory(base, [bad])
    assert cli_main(["trajectory", "--base", str(base), str(tmp_path / "empty_run"), "--out", str(tmp_path / "o")]) == 2
    assert "no checkpoint-N subfolders" in capsys.readouterr().err
