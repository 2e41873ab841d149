"""Finetuning-trajectory analysis: does the first epoch dominate τ? (arXiv:2508.16082, Sec. 5)

Given the base θ0 and per-epoch checkpoints θ_1..θ_E (full finetunes, PEFT adapters or stored
task vectors; τ_e = θ_e − θ0), reports, per tensor, per layer and overall:

* update norms ‖θ_e − θ_{e−1}‖ = ‖τ_e − τ_{e−1}‖ for every epoch (τ_0 = 0),
* ‖τ_e‖ and cos(τ_e, τ_E) for every epoch,
* the first epoch's share of τ, ‖τ_1‖ / ‖τ_E‖, and cos(τ_1, τ_E).

It streams: for each tensor it holds τ_E, τ_{e−1} and τ_e (plus the base tensor), and adds
float64 squared norms and dot products into small accumulators.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import torch

from .errors import CheckpointError, TaskArithError
from .geometry import delta_of, layer_key, layer_sort_key, open_task_vector, short_label, tensor_names

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def find_checkpoints(paths: Sequence[Union[str, Path]]) -> List[Path]:
    """Checkpoints in training order.

    One folder holding ``checkpoint-N`` subfolders (a Trainer ``output_dir``) gives those, sorted by
    N (a final model saved at the top level is not added: it is normally the last checkpoint);
    otherwise every path is a checkpoint, in the order given.

    Raises:
        CheckpointError: if a path does not exist, or a run folder has no checkpoints.
    """
    if not paths:
        raise TaskArithError("trajectory: give a run folder or at least one checkpoint")
    paths = [Path(p).expanduser() for p in paths]
    for p in paths:
        if not p.is_dir():
            raise CheckpointError(f"{p}: checkpoint folder not found")
    if len(paths) == 1:
        subs = [(int(m.group(1)), d) for d in paths[0].iterdir() if d.is_dir() and (m := _CKPT.match(d.name))]
        if subs:
            return [d for _, d in sorted(subs)]
        if not any(paths[0].glob("*.safetensors")) and not any(paths[0].glob("*.bin")) \
                and not (paths[0] / "task_vector.json").is_file():
            raise CheckpointError(f"{paths[0]}: no checkpoint-N subfolders and no weights (not a run folder or checkpoint)")
    return paths


@dataclass
class TrajectoryStats:
    """float64 accumulators for E checkpoints: Σ‖τ_e − τ_{e−1}‖², Σ‖τ_e‖², Σ<τ_e, τ_E>."""

    step_sq: List[float]
    norm_sq: List[float]
    dot_final: List[float]

    @classmethod
    def zeros(cls, e: int) -> "TrajectoryStats":
        return cls([0.0] * e, [0.0] * e, [0.0] * e)

    def __add__(self, other: "TrajectoryStats") -> "TrajectoryStats":
        add = lambda a, b: [x + y for x, y in zip(a, b)]  # noqa: E731
        return TrajectoryStats(add(self.step_sq, other.step_sq), add(self.norm_sq, other.norm_sq),
                               add(self.dot_final, other.dot_final))

    def update_norms(self) -> List[float]:
        return [math.sqrt(v) for v in self.step_sq]

    def tau_norms(self) -> List[float]:
        return [math.sqrt(v) for v in self.norm_sq]

    def cos_to_final(self) -> List[Optional[float]]:
        nf = math.sqrt(self.norm_sq[-1])
        return [d / (math.sqrt(n) * nf) if n > 0 and nf > 0 else None for d, n in zip(self.dot_final, self.norm_sq)]

    def first_share(self) -> Optional[float]:
        nf = math.sqrt(self.norm_sq[-1])
        return math.sqrt(self.norm_sq[0]) / nf if nf > 0 else None

    def to_dict(self) -> Dict[str, Any]:
        cos = self.cos_to_final()
        return {"update_norms": self.update_norms(), "tau_norms": self.tau_norms(), "cos_to_final": cos,
                "first_epoch_share": self.first_share(), "cos_first_final": cos[0]}


def accumulate(final: torch.Tensor, taus: Iterable[torch.Tensor], count: int) -> TrajectoryStats:
    """Pure: the stats of one tensor from τ_E (``final``) and τ_1..τ_E yielded one at a time.

    Holds τ_E, τ_{e−1} and τ_e only, so ``taus`` may read each checkpoint lazily.
    """
    stats = TrajectoryStats.zeros(count)
    final = final.reshape(-1).double()
    prev = torch.zeros_like(final)
    seen = 0
    for i, tau in enumerate(taus):
        cur = tau.reshape(-1).double()
        stats.step_sq[i] = float((cur - prev).square().sum())
        stats.norm_sq[i] = float(cur.square().sum())
        stats.dot_final[i] = float(cur @ final)
        prev = cur
        seen += 1
    if seen != count:
        raise TaskArithError(f"trajectory: expected {count} checkpoints, got {seen}")
    return stats


@dataclass
class TrajectoryReport:
    """Result of :func:`analyze_trajectory`."""

    checkpoints: List[str]
    overall: TrajectoryStats
    per_layer: Dict[str, TrajectoryStats] = field(default_factory=dict)
    per_tensor: Dict[str, TrajectoryStats] = field(default_factory=dict)
    base: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return {
            "base": self.base,
            "checkpoints": self.checkpoints,
            "definitions": {
                "update_norms": "||theta_e - theta_{e-1}|| per checkpoint (theta_0 = base)",
                "first_epoch_share": "||theta_1 - theta_0|| / ||theta_E - theta_0||",
                "cos_first_final": "cos(theta_1 - theta_0, theta_E - theta_0)",
            },
            "overall": self.overall.to_dict(),
            "per_layer": {k: self.per_layer[k].to_dict() for k in sorted(self.per_layer, key=layer_sort_key)},
            "per_tensor": {k: v.to_dict() for k, v in self.per_tensor.items()},
        }

    def table(self) -> str:
        o = self.overall
        lines = ["## Finetuning trajectory", "", "| checkpoint | ‖θ_e − θ_{e−1}‖ | ‖τ_e‖ | cos(τ_e, τ_final) |",
                 "|---|---|---|---|"]
        for name, u, n, c in zip(self.checkpoints, o.update_norms(), o.tau_norms(), o.cos_to_final()):
            lines.append(f"| {name} | {u:.6g} | {n:.6g} | {'—' if c is None else f'{c:.4f}'} |")
        share = o.first_share()
        lines += ["", f"first checkpoint's share of ‖τ‖: {'—' if share is None else f'{share:.4f}'}; "
                  f"cos(τ_1, τ_final): {'—' if o.cos_to_final()[0] is None else f'{o.cos_to_final()[0]:.4f}'}",
                  "", "| layer | share ‖τ_1‖/‖τ_final‖ | cos(τ_1, τ_final) |", "|---|---|---|"]
        for k in sorted(self.per_layer, key=layer_sort_key):
            s = self.per_layer[k]
            sh, c = s.first_share(), s.cos_to_final()[0]
            lines.append(f"| {k} | {'—' if sh is None else f'{sh:.4f}'} | {'—' if c is None else f'{c:.4f}'} |")
        return "\n".join(lines) + "\n"

    def save(self, out_dir: Union[str, Path], *, overwrite: bool = False) -> Dict[str, Path]:
        """Write ``trajectory.json``, ``trajectory.md`` and ``trajectory.png``, atomically."""
        from .writer import atomic_output_dir

        with atomic_output_dir(out_dir, overwrite) as tmp:
            (tmp / "trajectory.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")
            (tmp / "trajectory.md").write_text(self.table())
            self._plot(tmp / "trajectory.png")
        out = Path(out_dir).expanduser().resolve()
        return {"json": out / "trajectory.json", "table": out / "trajectory.md", "plot": out / "trajectory.png"}

    def _plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        o = self.overall
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
        x = range(1, len(self.checkpoints) + 1)
        a1.bar(x, o.update_norms(), label="‖θ_e − θ_{e−1}‖")
        a1.plot(x, o.tau_norms(), "o-", color="C1", label="‖τ_e‖")
        a1.set_xlabel("checkpoint")
        a1.set_xticks(list(x))
        a1.set_title("update norms")
        a1.legend(fontsize=8)
        layers = sorted(self.per_layer, key=layer_sort_key)
        share = [self.per_layer[k].first_share() for k in layers]
        cos = [self.per_layer[k].cos_to_final()[0] for k in layers]
        nan = lambda v: float("nan") if v is None else v  # noqa: E731
        a2.plot(range(len(layers)), [nan(v) for v in share], "o-", label="‖τ_1‖/‖τ_final‖")
        a2.plot(range(len(layers)), [nan(v) for v in cos], "s-", label="cos(τ_1, τ_final)")
        a2.set_xticks(range(len(layers)), [short_label(k) for k in layers],
                      rotation=90, fontsize=7)
        a2.set_title("first checkpoint vs final, per layer")
        a2.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def analyze_trajectory(
    base,
    checkpoints: Sequence[Union[str, Path, Any]],
    *,
    labels: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    device: Union[str, torch.device, None] = None,
    per_tensor: bool = True,
    progress: bool = False,
) -> TrajectoryReport:
    """Per-epoch update norms, first-epoch share of ‖τ‖ and cos(τ_1, τ_final), streamed.

    Args:
        base: θ0 (reference or ``BaseModel``).
        checkpoints: θ_1..θ_E in training order: folders (full finetunes, adapters, stored τ) or
            task vectors. Use :func:`find_checkpoints` for a Trainer run folder.
        labels: Names for the table (default: folder names).
        exclude: Patterns kept out of dense τ (e.g. a classification head).
        device: Where the math runs.
        per_tensor: Also report every tensor.
        progress: Show a progress bar.

    Raises:
        CheckpointError, IncompatibleTensorsError: for missing checkpoints or shapes that differ
            from the base (checked from headers before any data is read).
    """
    from .engine import _progress, resolve_device
    from .task_vector import BaseModel, TaskVector

    if not checkpoints:
        raise TaskArithError("trajectory: give at least one checkpoint")
    base = BaseModel.coerce(base)
    dev = resolve_device(device)
    vectors = [c if isinstance(c, TaskVector) else open_task_vector(c, base, exclude=exclude) for c in checkpoints]
    labels = list(labels) if labels else [
        Path(str(c)).name if not isinstance(c, TaskVector) else f"checkpoint {i + 1}" for i, c in enumerate(checkpoints)
    ]
    order = tensor_names(vectors, base)
    if not order:
        raise TaskArithError("trajectory: the checkpoints change no tensor of the base")
    e = len(vectors)
    overall = TrajectoryStats.zeros(e)
    layers: Dict[str, TrajectoryStats] = {}
    tensors: Dict[str, TrajectoryStats] = {}
    bar = _progress(len(order), "Trajectory tensors", progress)
    for name in order:
        base_t = base.store.get(name).to(dev, torch.float32)
        final = delta_of(vectors[-1], name, base, base_t)
        lazy = (final if i == e - 1 else delta_of(tv, name, base, base_t) for i, tv in enumerate(vectors))
        stats = accumulate(final, lazy, e)
        overall = overall + stats
        key = layer_key(name)
        layers[key] = layers[key] + stats if key in layers else stats
        if per_tensor:
            tensors[name] = stats
        bar.update(1)
    bar.close()
    return TrajectoryReport(labels, overall, layers, tensors, base=base.resolved.display_name)
