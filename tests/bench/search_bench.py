"""Per-grid-point overhead of the coefficient search, evaluation excluded (issue 6).

    python tests/bench/search_bench.py MODE BASE FT1 [FT2 ...] --tmp DIR [--points 5]

MODE:

* ``inplace``: the base is loaded once as a transformers model (``AutoModelForCausalLM``, bf16);
  one ``hf_taskarith.search.InPlaceDelta`` over ``τ = Σ w_i (FT_i − BASE)`` (weights 0.5/0.3/0.2)
  sets ``θ0 + λ·τ`` in place at each grid point (from the originals, no revert in between) and
  reverts bitwise once at the end (timed separately): what ``search()`` does between
  evaluations, with its defaults (fp32 deltas cached on CPU after the first point, originals
  copied in the model dtype);
* ``inplace-nocache``: the same with ``cache=False`` (deltas recomputed from the checkpoints at
  every point: a few tensors of memory, one read of the inputs per point);
* ``save-reload``: what a search that writes each candidate does (mergekit-evolve style):
  ``MergedModel.save_pretrained`` of ``BASE + λ·τ`` (bf16) into ``--tmp``, then
  ``AutoModelForCausalLM.from_pretrained`` of it.

Prints one JSON line: ``load_s`` (the one-time model load, not part of a point), ``first_point_s``
(the first point: it fills the delta cache), ``points_s`` (every point), ``median_point_s`` (median
over points after the first), and for ``inplace`` whether the reverted weights are bitwise equal to
the loaded ones.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

WEIGHTS = (0.5, 0.3, 0.2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("inplace", "inplace-nocache", "save-reload"))
    p.add_argument("base")
    p.add_argument("fts", nargs="+")
    p.add_argument("--tmp", required=True, help="scratch folder for save-reload")
    p.add_argument("--points", type=int, default=5)
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)

    from transformers import AutoModelForCausalLM

    from hf_taskarith import BaseModel, TaskVector

    base = BaseModel(a.base)
    tau = sum(w * TaskVector.from_models(base, ft) for w, ft in zip(WEIGHTS, a.fts))
    grid = [round(0.2 * (i + 1), 3) for i in range(a.points)]
    out = {"mode": a.mode, "grid": grid}
    times = []
    if a.mode.startswith("inplace"):
        from hf_taskarith.search import InPlaceDelta

        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.bfloat16)
        out["load_s"] = time.perf_counter() - t0
        ref = {k: v.clone() for k, v in list(model.state_dict().items())[:3]} if a.mode == "inplace" else None
        patch = InPlaceDelta(model, tau, base=base, cache=(a.mode == "inplace"))
        for lam in grid:  # as search() does: point to point, no revert in between
            t0 = time.perf_counter()
            patch.apply(lam)
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        patch.revert()  # once, at the end of the search
        out["final_revert_s"] = time.perf_counter() - t0
        if ref is not None:
            sd = model.state_dict()
            out["revert_bitwise_sampled"] = all(torch.equal(sd[k], v) for k, v in ref.items())
        # every tensor, bitwise, against the checkpoint (untimed)
        sd = model.state_dict()
        out["revert_bitwise_all"] = all(
            torch.equal(sd[n], base.store.get(n).to(sd[n].dtype)) for n in base.store.keys() if n in sd
        )
    else:
        tmp = Path(a.tmp)
        model = None
        out["load_s"] = 0.0
        for lam in grid:
            shutil.rmtree(tmp, ignore_errors=True)
            t0 = time.perf_counter()
            del model
            (base + lam * tau).save_pretrained(tmp, dtype="bfloat16", overwrite=True, progress=False)
            model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16)
            times.append(time.perf_counter() - t0)
        shutil.rmtree(tmp, ignore_errors=True)
    out["first_point_s"] = times[0]
    out["points_s"] = times
    out["median_point_s"] = statistics.median(times[1:] if len(times) > 1 else times)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
