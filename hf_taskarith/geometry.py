"""Task-vector geometry: norms, pairwise cosines, sign conflicts and top-k mask overlap, streamed.

:func:`analyze_task_vectors` evaluates one tensor of every task vector at a time and adds it into
float64/int64 accumulators (:class:`PairwiseStats`), so memory is a few tensors whatever the model
size. Definitions, for task vectors τ_1..τ_T flattened over the tensors considered:

* **norm** ‖τ_i‖₂ and **cosine** cos(τ_i, τ_j) = <τ_i, τ_j> / (‖τ_i‖ ‖τ_j‖) (``None`` when a norm is 0).
* **pairwise sign-conflict rate** of (i, j): among coordinates where τ_i and τ_j are both nonzero,
  the fraction where their signs differ: #{τ_i·τ_j < 0} / #{τ_i ≠ 0 and τ_j ≠ 0} (``None`` if no
  coordinate is nonzero in both).
* **multi-task sign-conflict rate**: among coordinates where at least two task vectors are
  nonzero, the fraction where the nonzero entries do not all share one sign (TIES' interference).
* **top-k masks** at density d: with ``topk_scope="tensor"`` (default) each tensor keeps exactly
  k = int(d·numel) largest |τ_i| (:func:`hf_taskarith.methods.topk_mask`, the trim of TIES and
  magnitude pruning); the model-level mask is the union of these per-tensor masks (the aggregate
  of per-tensor top-k, which is what per-tensor trimming keeps). With ``topk_scope="global"`` the
  mask is |τ_i| >= t_i with t_i the exact whole-model k-th largest magnitude
  (:mod:`hf_taskarith.global_topk`, two extra streaming passes per task vector; ties at t_i kept).
  **overlap** = |M_i ∩ M_j| / min(|M_i|, |M_j|) (intersection over k) and
  **Jaccard** = |M_i ∩ M_j| / |M_i ∪ M_j|.

Everything is reported per tensor, per layer (tensors grouped by their ``layers.N`` / ``h.N``
block; others by name) and overall.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .errors import TaskArithError

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20  # elements per block (< 2^24: fp32 sign counts stay exact); T x 8 MB in float64
_LAYER = re.compile(r"^(.*?\.(?:layers|layer|h|blocks|block)\.\d+)\.")


def layer_key(name: str) -> str:
    """The layer a tensor belongs to: ``model.layers.3.mlp.up_proj.weight`` → ``model.layers.3``;
    tensors outside numbered blocks (embeddings, final norm, head) are their own group."""
    m = _LAYER.match(name)
    return m.group(1) if m else name


def layer_sort_key(key: str) -> Tuple[int, int, str]:
    """Order groups: numbered blocks by number, the rest by name after them."""
    m = re.search(r"\.(\d+)$", key)
    return (0, int(m.group(1)), key) if m and _LAYER.match(key + ".") else (1, 0, key)


def short_label(key: str) -> str:
    """Axis label of a layer group: ``model.layers.3`` → ``L3``; other groups keep their name."""
    return f"L{key.rsplit('.', 1)[-1]}" if layer_sort_key(key)[0] == 0 else key


# --------------------------------------------------------------------------- pure accumulators
@dataclass
class PairwiseStats:
    """Streaming accumulators over T task vectors (add tensor blocks with :meth:`update`).

    Attributes:
        dot: (T, T) float64, Σ τ_i τ_j over the coordinates seen.
        both_nonzero: (T, T) int64, #coordinates where τ_i ≠ 0 and τ_j ≠ 0.
        conflicts: (T, T) int64, #coordinates where τ_i τ_j < 0.
        multi_nonzero: #coordinates where at least two τ_i are nonzero.
        multi_conflict: #coordinates where some τ_i > 0 and some τ_j < 0.
        mask_count: (T,) int64, |M_i| (top-k masks given to :meth:`update`).
        mask_inter: (T, T) int64, |M_i ∩ M_j|.
        numel: coordinates seen.
    """

    dot: torch.Tensor
    both_nonzero: torch.Tensor
    conflicts: torch.Tensor
    mask_count: torch.Tensor
    mask_inter: torch.Tensor
    multi_nonzero: int = 0
    multi_conflict: int = 0
    numel: int = 0

    @classmethod
    def zeros(cls, t: int) -> "PairwiseStats":
        z = lambda *s, d=torch.int64: torch.zeros(*s, dtype=d)  # noqa: E731
        return cls(z(t, t, d=torch.float64), z(t, t), z(t, t), z(t), z(t, t))

    @property
    def size(self) -> int:
        return int(self.dot.shape[0])

    def update(self, deltas: torch.Tensor, masks: Optional[torch.Tensor] = None) -> "PairwiseStats":
        """Add one block: ``deltas`` (T, ...) (any float dtype/device), ``masks`` (T, ...) bool or None."""
        t = deltas.shape[0]
        if t != self.size:
            raise TaskArithError(f"PairwiseStats: expected {self.size} task vectors, got {t}")
        flat = deltas.reshape(t, -1)
        mflat = masks.reshape(t, -1) if masks is not None else None
        n = flat.shape[1]
        for start in range(0, n, _CHUNK):
            block = flat[:, start:start + _CHUNK]
            x = block.to(torch.float64)
            self.dot += (x @ x.T).cpu()
            # Signs as fp32 in {-1, 0, 1}: integer sums below 2^24 are exact, so the counts are exact.
            sgn = torch.sign(block.float())
            nz = sgn.abs()
            both = nz @ nz.T  # both nonzero
            agree_minus_disagree = sgn @ sgn.T  # over coordinates where both are nonzero
            self.both_nonzero += both.round().to(torch.int64).cpu()
            self.conflicts += ((both - agree_minus_disagree) / 2).round().to(torch.int64).cpu()
            count = nz.sum(0)
            self.multi_nonzero += int(torch.count_nonzero(count >= 2))
            self.multi_conflict += int(torch.count_nonzero(sgn.sum(0).abs() < count))  # not all one sign
            if mflat is not None:
                m = mflat[:, start:start + _CHUNK].float()
                inter = (m @ m.T).round().to(torch.int64).cpu()
                self.mask_inter += inter
                self.mask_count += inter.diagonal()
        self.numel += n
        return self

    def __add__(self, other: "PairwiseStats") -> "PairwiseStats":
        return PairwiseStats(
            self.dot + other.dot, self.both_nonzero + other.both_nonzero, self.conflicts + other.conflicts,
            self.mask_count + other.mask_count, self.mask_inter + other.mask_inter,
            self.multi_nonzero + other.multi_nonzero, self.multi_conflict + other.multi_conflict,
            self.numel + other.numel,
        )

    # ---------------------------------------------------------------- derived quantities
    def norms(self) -> List[float]:
        return [math.sqrt(max(float(v), 0.0)) for v in self.dot.diagonal()]

    def cosine(self) -> List[List[Optional[float]]]:
        n = self.norms()
        return [[(float(self.dot[i, j]) / (n[i] * n[j]) if n[i] > 0 and n[j] > 0 else None)
                 for j in range(self.size)] for i in range(self.size)]

    def sign_conflict_rate(self) -> List[List[Optional[float]]]:
        return [[_ratio(self.conflicts[i, j], self.both_nonzero[i, j]) for j in range(self.size)]
                for i in range(self.size)]

    def multi_sign_conflict_rate(self) -> Optional[float]:
        return _ratio(self.multi_conflict, self.multi_nonzero)

    def topk_overlap(self) -> List[List[Optional[float]]]:
        c = self.mask_count
        return [[_ratio(self.mask_inter[i, j], min(int(c[i]), int(c[j]))) for j in range(self.size)]
                for i in range(self.size)]

    def topk_jaccard(self) -> List[List[Optional[float]]]:
        c = self.mask_count
        return [[_ratio(self.mask_inter[i, j], int(c[i]) + int(c[j]) - int(self.mask_inter[i, j]))
                 for j in range(self.size)] for i in range(self.size)]

    def to_dict(self, with_topk: bool = True) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "numel": self.numel,
            "norms": self.norms(),
            "cosine": self.cosine(),
            "sign_conflict_rate": self.sign_conflict_rate(),
            "both_nonzero": self.both_nonzero.tolist(),
            "multi_sign_conflict_rate": self.multi_sign_conflict_rate(),
        }
        if with_topk:
            out.update(topk_count=self.mask_count.tolist(), topk_overlap=self.topk_overlap(),
                       topk_jaccard=self.topk_jaccard())
        return out


def _ratio(num, den) -> Optional[float]:
    den = int(den)
    return float(int(num)) / den if den > 0 else None


# --------------------------------------------------------------------------- opening inputs
def open_task_vector(ref: Union[str, Path], base, *, adapter: Optional[bool] = None,
                     exclude: Optional[Sequence[str]] = None):
    """A leaf task vector from a reference: a stored τ folder (``task_vector.json``), a PEFT adapter
    (``adapter_config.json``, or ``adapter=True``) or a full finetune (anything else).

    Args:
        ref: Folder or Hub reference.
        base: The base (reference or ``BaseModel``) a full finetune is compared with.
        adapter: Force the adapter (True) or full-finetune (False) reading.
        exclude: Patterns kept out of a dense τ.
    """
    from .stored import StoredTaskVector, is_task_vector_folder
    from .task_vector import TaskVector

    path = Path(str(ref)).expanduser()
    if adapter is None and path.is_dir():
        if is_task_vector_folder(path):
            return StoredTaskVector.load(path)
        adapter = (path / "adapter_config.json").is_file()
    if adapter:
        return TaskVector.from_adapter(ref)
    return TaskVector.from_models(base, ref, exclude=exclude)


def tensor_names(vectors: Sequence[Any], base) -> List[str]:
    """Base tensors changed by any of the task vectors, in base file order (header checks only)."""
    from .checkpoint import iter_in_file_order

    touched = set()
    for tv in vectors:
        for _, leaf in tv.terms():
            touched.update(leaf.bind(base.store, base.config))
    return [n for n in iter_in_file_order(base.store) if n in touched]


def delta_of(tv, name: str, base, base_tensor: torch.Tensor) -> torch.Tensor:
    """τ[name] of one task-vector expression, fp32 on ``base_tensor``'s device."""
    acc = torch.zeros_like(base_tensor)
    for coef, leaf in tv.terms():
        leaf.add_delta_(acc, name, coef, base.store, base_tensor)
    return acc


# --------------------------------------------------------------------------- the analysis
@dataclass
class GeometryReport:
    """Result of :func:`analyze_task_vectors`: stats per tensor, per layer and overall."""

    names: List[str]
    density: float
    topk_scope: str
    overall: PairwiseStats
    per_layer: Dict[str, PairwiseStats] = field(default_factory=dict)
    per_tensor: Dict[str, PairwiseStats] = field(default_factory=dict)
    base: str = ""

    def to_dict(self) -> Dict[str, Any]:
        layers = sorted(self.per_layer, key=layer_sort_key)
        return {
            "base": self.base,
            "task_vectors": self.names,
            "density": self.density,
            "topk_scope": self.topk_scope,
            "definitions": {
                "cosine": "<a,b>/(|a||b|) over all coordinates considered",
                "sign_conflict_rate": "#{a_i*b_i<0} / #{a_i!=0 and b_i!=0}",
                "multi_sign_conflict_rate": "#{coords with both signs among nonzero entries} / #{coords with >=2 nonzero}",
                "topk_overlap": "|M_a ∩ M_b| / min(|M_a|,|M_b|); M = top-k mask "
                + ("per tensor (k=int(density*numel)), unioned over tensors" if self.topk_scope == "tensor"
                   else "over the whole model (|tau| >= exact global k-th largest)"),
                "topk_jaccard": "|M_a ∩ M_b| / |M_a ∪ M_b|",
            },
            "overall": self.overall.to_dict(),
            "per_layer": {k: self.per_layer[k].to_dict() for k in layers},
            "per_tensor": {k: v.to_dict() for k, v in self.per_tensor.items()},
        }

    def table(self) -> str:
        """Markdown: overall norms and the pairwise matrices."""
        o = self.overall
        lines = [f"## Task-vector geometry (density {self.density}, top-k scope {self.topk_scope})", "",
                 "| task vector | norm |", "|---|---|"]
        lines += [f"| {n} | {v:.6g} |" for n, v in zip(self.names, o.norms())]
        for title, mat in (("cosine", o.cosine()), ("sign-conflict rate", o.sign_conflict_rate()),
                           ("top-k overlap", o.topk_overlap()), ("top-k Jaccard", o.topk_jaccard())):
            lines += ["", f"### {title}", "", "| | " + " | ".join(self.names) + " |",
                      "|---" * (len(self.names) + 1) + "|"]
            lines += [f"| {n} | " + " | ".join("—" if v is None else f"{v:.4f}" for v in row) + " |"
                      for n, row in zip(self.names, mat)]
        rate = o.multi_sign_conflict_rate()
        lines += ["", f"multi-task sign-conflict rate: {'—' if rate is None else f'{rate:.4f}'}"]
        return "\n".join(lines) + "\n"

    def save(self, out_dir: Union[str, Path], *, overwrite: bool = False) -> Dict[str, Path]:
        """Write ``geometry.json``, ``geometry.md`` and heatmap PNGs, atomically.

        Returns:
            Paths by kind: json, table, cosine, sign_conflict, topk_overlap, per_layer_cosine.
        """
        from .writer import atomic_output_dir

        names = ["geometry.json", "geometry.md", "cosine.png", "sign_conflict.png", "topk_overlap.png",
                 "per_layer_cosine.png"]
        with atomic_output_dir(out_dir, overwrite) as tmp:
            (tmp / names[0]).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
            (tmp / names[1]).write_text(self.table())
            o = self.overall
            heatmap(o.cosine(), self.names, "cosine similarity", tmp / names[2], vmin=-1, vmax=1, cmap="RdBu_r")
            heatmap(o.sign_conflict_rate(), self.names, "sign-conflict rate", tmp / names[3], vmin=0, vmax=1)
            heatmap(o.topk_overlap(), self.names, f"top-k overlap (density {self.density})", tmp / names[4],
                    vmin=0, vmax=1)
            _per_layer_plot(self, tmp / names[5])
        out = Path(out_dir).expanduser().resolve()
        return dict(zip(["json", "table", "cosine", "sign_conflict", "topk_overlap", "per_layer_cosine"],
                        [out / n for n in names]))


def heatmap(matrix: Sequence[Sequence[Optional[float]]], labels: Sequence[str], title: str, path: Path,
            vmin: float = 0.0, vmax: float = 1.0, cmap: str = "viridis") -> None:
    """A labelled T×T heatmap PNG (``None`` cells blank)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = len(labels)
    data = [[float("nan") if v is None else v for v in row] for row in matrix]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * t, 1.0 + 0.8 * t))
    im = ax.imshow(data, vmin=vmin, vmax=vmax, cmap=cmap)
    ax.set_xticks(range(t), labels, rotation=45, ha="right")
    ax.set_yticks(range(t), labels)
    for i in range(t):
        for j in range(t):
            if not math.isnan(data[i][j]):
                dark = abs(data[i][j] - (vmin + vmax) / 2) > 0.3 * (vmax - vmin)  # readable on strong colours
                ax.text(j, i, f"{data[i][j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _per_layer_plot(report: GeometryReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(report.per_layer, key=layer_sort_key)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(layers) + 2), 3.5))
    t = len(report.names)
    for i in range(t):
        for j in range(i + 1, t):
            ys = [report.per_layer[k].cosine()[i][j] for k in layers]
            ax.plot(range(len(layers)), [float("nan") if y is None else y for y in ys], marker="o",
                    label=f"{report.names[i]} vs {report.names[j]}")
    ax.set_xticks(range(len(layers)), [short_label(k) for k in layers],
                  rotation=90, fontsize=7)
    ax.set_ylabel("cosine")
    ax.set_title("per-layer cosine")
    if t > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def analyze_task_vectors(
    base,
    vectors: Union[Sequence[Any], Dict[str, Any]],
    *,
    names: Optional[Sequence[str]] = None,
    density: float = 0.2,
    topk_scope: str = "tensor",
    device: Union[str, torch.device, None] = None,
    per_tensor: bool = True,
    progress: bool = False,
) -> GeometryReport:
    """Norms, cosines, sign conflicts and top-k overlap of task vectors, one tensor at a time.

    Args:
        base: The base model (reference or ``BaseModel``) every task vector is relative to.
        vectors: Task vectors (any ``TaskVector``: dense, LoRA, stored, expressions), or name → vector.
        names: Display names (default: each vector's name).
        density: Fraction kept by the top-k masks (0 < density <= 1).
        topk_scope: ``"tensor"`` (per-tensor top-k, unioned) or ``"global"`` (exact whole-model top-k).
        device: Where the math runs (``cpu`` default, ``cuda``).
        per_tensor: Also report every tensor (JSON grows with the number of tensors).
        progress: Show a progress bar.

    Returns:
        A :class:`GeometryReport` (``.save(dir)`` writes JSON, a table and heatmaps).

    Raises:
        TaskArithError: for bad options or fewer than one task vector.
        IncompatibleTensorsError: if a task vector does not fit the base (checked from headers first).
    """
    from .engine import _progress, resolve_device
    from .methods import topk_mask
    from .task_vector import BaseModel

    if isinstance(vectors, dict):
        names = list(vectors) if names is None else names
        vectors = list(vectors.values())
    vectors = list(vectors)
    if not vectors:
        raise TaskArithError("analyze: give at least one task vector")
    if not 0 < density <= 1:
        raise TaskArithError(f"analyze: density must be in (0, 1], got {density}")
    if topk_scope not in ("tensor", "global"):
        raise TaskArithError(f"analyze: topk_scope must be 'tensor' or 'global', got {topk_scope!r}")
    names = list(names) if names is not None else [_display(tv) for tv in vectors]
    if len(names) != len(vectors):
        raise TaskArithError(f"analyze: {len(names)} names for {len(vectors)} task vectors")
    base = BaseModel.coerce(base)
    dev = resolve_device(device)
    order = tensor_names(vectors, base)
    if not order:
        raise TaskArithError("analyze: the task vectors change no tensor of the base")

    def deltas(name: str) -> torch.Tensor:
        base_t = base.store.get(name).to(dev, torch.float32)
        return torch.stack([delta_of(tv, name, base, base_t) for tv in vectors])

    thresholds = None
    if topk_scope == "global":
        from .global_topk import kth_largest_magnitudes

        total = sum(math.prod(base.store.shape(n)) for n in order)
        k = int(density * total)
        thresholds = []
        for i, tv in enumerate(vectors):
            def stream(tv=tv):
                for n in order:
                    base_t = base.store.get(n).to(dev, torch.float32)
                    yield delta_of(tv, n, base, base_t).cpu()
            thresholds.append(kth_largest_magnitudes(stream, [k])[0])

    t = len(vectors)
    overall = PairwiseStats.zeros(t)
    layers: Dict[str, PairwiseStats] = {}
    tensors: Dict[str, PairwiseStats] = {}
    bar = _progress(len(order), "Analyzing tensors", progress)
    for name in order:
        d = deltas(name)
        if thresholds is None:
            k = int(density * d[0].numel())
            masks = torch.stack([topk_mask(d[i], k) for i in range(t)])
        else:
            masks = torch.stack([d[i].abs() >= thresholds[i] for i in range(t)])
        stats = PairwiseStats.zeros(t).update(d, masks)
        overall = overall + stats
        key = layer_key(name)
        layers[key] = layers[key] + stats if key in layers else stats
        if per_tensor:
            tensors[name] = stats
        bar.update(1)
    bar.close()
    return GeometryReport(names, density, topk_scope, overall, layers, tensors, base=base.resolved.display_name)


def _display(tv) -> str:
    terms = tv.terms()
    if len(terms) == 1 and terms[0][0] == 1.0:
        return terms[0][1].name
    return " ".join(f"{c:+g}·{leaf.name}" for c, leaf in terms)
