"""Benchmark harness: ``make bench`` → ``BENCHMARKS.md``.

    .venv/bin/python tests/bench/run_bench.py --out BENCHMARKS.md [--only floor,apply] [--repeats 3]

Each section is a function registered in ``SECTIONS`` (see ``@section``); it runs its commands
through ``measure.measure`` (median wall time of ``--repeats`` runs, peak RSS of the child, warm
page cache) and returns a ``SectionResult`` that is rendered as a markdown table between
``<!-- section:NAME -->`` / ``<!-- /section:NAME -->`` markers. An existing output file is merged
section by section: sections not run keep their previous text, so ``--only`` refreshes part of
the file.

Inputs are synthetic Llama checkpoints from ``synth.py``, cached under ``bench_work/models``
(git-ignored). Outputs go to ``bench_work/out/<section>`` and are deleted after the section
unless ``--keep-outputs``. Raw numbers are also kept in ``bench_work/results.json``, which is
where a section finds the IO floor when ``floor`` is not part of the current run.

A command that is missing or fails is reported as FAILED with the tail of its stderr; the
harness itself carries on.

Adding a section: write ``def section_x(ctx: Context) -> SectionResult`` decorated with
``@section("x", "Title")``; use ``ctx.suite()`` for inputs, ``ctx.measure(...)`` to run commands,
``ctx.floor()`` for the ratio column, ``Row``/``SectionResult`` for the output.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import measure as _measure  # noqa: E402
import synth  # noqa: E402

GB = 1e9


# --------------------------------------------------------------------------- results & rendering


@dataclass
class Row:
    """One table row: a displayed command and its measurement."""

    command: str  # as displayed, paths replaced by placeholders
    m: _measure.Measurement
    floor_wall_s: Optional[float] = None  # for the "wall / floor" column
    note: str = ""

    def cells(self) -> List[str]:
        cmd = f"`{self.command}`"
        if self.note:
            cmd += f" ({self.note})"
        if not self.m.ok:
            return [cmd, "**FAILED**", "—", "—"]
        wall = self.m.median_wall_s
        ratio = f"{wall / self.floor_wall_s:.2f}" if self.floor_wall_s else "—"
        return [cmd, f"{wall:.2f}", f"{self.m.peak_rss_bytes / GB:.2f}", ratio]


@dataclass
class SectionResult:
    """What a section returns: intro text, a table of rows, markdown notes after the table."""

    title: str
    intro: str = ""
    rows: List[Row] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)  # extra raw results for results.json
    legend: Dict[str, str] = field(default_factory=dict)  # placeholder → meaning
    table: Optional[List[str]] = None  # markdown lines replacing the default table of ``rows``
    runs_text: Optional[str] = None  # replaces "median of N runs" in the section's header line

    @property
    def failed(self) -> bool:
        return any(not r.m.ok for r in self.rows) or bool(self.data.get("verify_failed"))


def render_section(name: str, res: SectionResult, ctx: "Context") -> str:
    """Markdown for one section, markers included."""
    out = [f"<!-- section:{name} -->", f"## {res.title}", ""]
    runs = res.runs_text or f"median of {ctx.repeats} run{'s' if ctx.repeats != 1 else ''}"
    load = res.data.get("loadavg")
    load_text = (
        f" 1-minute load average {load[0]:.1f} at the start and {load[1]:.1f} at the end of the section"
        " (other jobs shared the machine: timings are noisy)." if load else ""
    )
    out.append(
        f"_Measured {ctx.started} on {ctx.machine['summary']}; git {ctx.machine['git']}; "
        f"{runs} after an untimed read of the inputs (warm page cache).{load_text} "
        f"Rerun: `{ctx.rerun_command(name)}`._"
    )
    out.append("")
    if res.intro:
        out += [res.intro.strip(), ""]
    if res.legend:
        out.append("; ".join(f"`{k}` = {v}" for k, v in res.legend.items()) + ".")
        out.append("")
    if res.table is not None:
        out += [*res.table, ""]
    elif res.rows:
        out.append("| Command | Median wall (s) | Peak RSS (GB) | Wall / floor |")
        out.append("|---|---:|---:|---:|")
        out += ["| " + " | ".join(r.cells()) + " |" for r in res.rows]
        out.append("")
    for r in res.rows:
        if not r.m.ok:
            out.append(f"**FAILED** `{r.command}`: {r.m.error}. Last lines of stderr:")
            out += ["", "```", r.m.stderr_tail or "(empty)", "```", ""]
    for n in res.notes:
        out += [n.rstrip(), ""]
    out.append(f"<!-- /section:{name} -->")
    return "\n".join(out)


_SECTION_RE = re.compile(r"<!-- section:([\w-]+) -->\n.*?<!-- /section:\1 -->", re.S)


def merge_document(old: str, new_sections: Dict[str, str], header: str) -> str:
    """New header, then sections: freshly run ones replace old ones of the same name, the others
    are kept; registry order first, then unknown names in their old order."""
    blocks = {m.group(1): m.group(0) for m in _SECTION_RE.finditer(old)}
    blocks.update(new_sections)
    order = [n for n in SECTIONS if n in blocks] + [n for n in blocks if n not in SECTIONS]
    return header.rstrip() + "\n\n" + "\n\n".join(blocks[n] for n in order) + "\n"


# --------------------------------------------------------------------------- machine description


def _git_rev() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "hf_taskarith"], cwd=REPO, capture_output=True, text=True).stdout
        return sha.strip() + ("+dirty" if dirty.strip() else "") if sha.strip() else "unknown"
    except OSError:
        return "unknown"


def machine_info() -> dict:
    """nproc, RAM, CPU model, versions; ``fingerprint`` decides whether a cached floor is reusable."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        import torch

        torch_v = torch.__version__
    except ImportError:  # pragma: no cover
        torch_v = "n/a"
    summary = f"{nproc} CPU cores ({cpu}), {mem / 2**30:.0f} GiB RAM"
    return {
        "nproc": nproc,
        "cpu": cpu,
        "mem_bytes": mem,
        "summary": summary,
        "python": platform.python_version(),
        "torch": torch_v,
        "kernel": platform.release(),
        "git": _git_rev(),
        "fingerprint": f"{nproc}|{cpu}|{mem // 2**30}",
    }


# --------------------------------------------------------------------------- context


class Context:
    """What sections share: arguments, paths, synthetic inputs, the IO floor, results.json."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.repeats: int = args.repeats
        self.layers: int = args.layers
        self.work = Path(args.work).resolve()
        self.models_dir = self.work / "models"
        self.out_dir = self.work / "out"
        self.results_path = self.work / "results.json"
        self.started = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        self.machine = machine_info()
        self.bin = Path(sys.executable).parent  # the venv's bin (console scripts live there)
        self.python = sys.executable
        self._floors: Dict[int, dict] = {}
        self._placeholders: Dict[str, str] = {}
        self._written: Dict[str, set] = {}  # results.json entries this run produced
        try:
            self.results = json.loads(self.results_path.read_text())
        except (OSError, ValueError):
            self.results = {}

    # ---- inputs
    def suite(self, layers: Optional[int] = None, n_finetunes: int = 3) -> Tuple[Path, List[Path]]:
        """Synthetic base + finetunes (generated once, then cached); registers BASE/FTi placeholders.
        ``layers`` defaults to ``--layers`` (16: the 1x model)."""
        layers = layers or self.layers
        cached = synth.suite_is_cached(self.models_dir, layers, n_finetunes)
        t0 = time.perf_counter()
        base, fts = synth.ensure_suite(self.models_dir, layers, n_finetunes)
        if not cached:
            secs = round(time.perf_counter() - t0, 1)
            self.record("synth", f"L{layers}", {"seconds": secs, "n_models": 1 + n_finetunes, "date": self.started})
        suffix = "" if layers == self.layers else f"_L{layers}"
        self._placeholders[str(base)] = "BASE" + suffix
        for i, ft in enumerate(fts, 1):
            self._placeholders[str(ft)] = f"FT{i}{suffix}"
        return base, fts

    def output(self, section: str, name: str = "merged") -> Path:
        """An output path ``bench_work/out/<section>/<name>``; its parent is wiped by ``clean_output``."""
        p = self.out_dir / section / name
        self._placeholders[str(p)] = "OUT"
        return p

    def clean_output(self, section: str) -> None:
        """Delete a section's output folder (and any temporary siblings) and flush dirty pages."""
        shutil.rmtree(self.out_dir / section, ignore_errors=True)
        (self.out_dir / section).mkdir(parents=True, exist_ok=True)
        os.sync()

    def display(self, cmd: Sequence[str]) -> str:
        """The command as shown in the table: known paths → placeholders, venv/bench paths shortened."""
        parts = []
        for c in map(str, cmd):
            for path, ph in sorted(self._placeholders.items(), key=lambda kv: -len(kv[0])):
                c = c.replace(path, ph)
            if c == self.python:
                c = "python"
            elif c.startswith(str(self.bin) + os.sep):
                c = c[len(str(self.bin)) + 1 :]
            elif c.startswith(str(REPO) + os.sep):
                c = c[len(str(REPO)) + 1 :]
            parts.append(c)
        return " ".join(parts)

    def model_legend(self, layers: Optional[int] = None) -> Dict[str, str]:
        """Placeholder descriptions for a suite, for ``SectionResult.legend``."""
        layers = layers or self.layers
        base = synth.suite_paths(self.models_dir, layers)[0]
        size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        n_shards = len(list(base.glob("*.safetensors")))
        n_params = size // 2
        return {
            "BASE": f"synthetic Llama ({layers} layers, hidden 2048, {n_params / 1e9:.2f}B params, bf16, "
            f"{n_shards} shard{'s' if n_shards != 1 else ''}, {size / GB:.2f} GB; `tests/bench/synth.py`)",
            "FT1..FT3": "finetunes of it (base + 0.002·N(0,1) per weight)",
            "OUT": "output folder",
        }

    # ---- running
    def measure(
        self, cmd: Sequence[str], warm: Sequence[Path], section: str, repeats: Optional[int] = None,
        env_extra: Optional[Dict[str, str]] = None,
    ) -> _measure.Measurement:
        """``measure.measure`` with the harness defaults: repeats (``--repeats`` unless given), fresh
        output folder before each run, offline HF env (plus ``env_extra``), per-run timeout."""
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
        print(f"[bench] {self.display(cmd)}", file=sys.stderr, flush=True)
        m = _measure.measure(
            cmd,
            repeats=self.repeats if repeats is None else repeats,
            warm_paths=warm,
            before_each=lambda: self.clean_output(section),
            env=env,
            timeout_s=self.args.timeout,
        )
        if m.ok:
            print(f"[bench]   median {m.median_wall_s:.2f}s, peak RSS {m.peak_rss_bytes / GB:.2f} GB "
                  f"(walls {', '.join(f'{r.wall_s:.2f}' for r in m.runs)})", file=sys.stderr, flush=True)
        else:
            print(f"[bench]   FAILED: {m.error}\n{m.stderr_tail}", file=sys.stderr, flush=True)
        return m

    def rerun_command(self, name: str) -> str:
        return f".venv/bin/python tests/bench/run_bench.py --out {self.args.out} --only {name}"

    # ---- IO floor
    def floor_cmd(self, base: Path, fts: Sequence[Path], out: Path) -> List[str]:
        return [self.python, str(HERE / "io_floor.py"), str(base), *map(str, fts), str(out)]

    def floor(self, layers: Optional[int] = None) -> Optional[float]:
        """Median wall time of the IO floor for the suite with ``layers`` layers: from this run, else
        from results.json (same machine, same synthetic data), else measured now."""
        layers = layers or self.layers
        if layers in self._floors:
            return self._floors[layers]["median_wall_s"]
        key = f"L{layers}"
        cached = self.results.get("floors", {}).get(key)
        if (
            cached
            and cached.get("fingerprint") == self.machine["fingerprint"]
            and cached.get("synth_version") == synth.SYNTH_VERSION
            and cached.get("median_wall_s")
        ):
            self._floors[layers] = cached
            return cached["median_wall_s"]
        base, fts = self.suite(layers)
        m = self.measure(self.floor_cmd(base, fts, self.output("floor")), [base, *fts], "floor")
        self._record_floor(layers, m)
        if not self.args.keep_outputs:
            shutil.rmtree(self.out_dir / "floor", ignore_errors=True)
        return m.median_wall_s

    def _record_floor(self, layers: int, m: _measure.Measurement) -> None:
        rec = {
            **m.to_dict(),
            "fingerprint": self.machine["fingerprint"],
            "synth_version": synth.SYNTH_VERSION,
            "date": self.started,
        }
        self._floors[layers] = rec
        if m.ok:
            self.record("floors", f"L{layers}", rec)

    def save_results(self) -> None:
        """Write results.json: entries this run produced replace those on disk, the rest of the file
        (e.g. sections another run wrote meanwhile) is kept."""
        self.work.mkdir(parents=True, exist_ok=True)
        try:
            disk = json.loads(self.results_path.read_text())
        except (OSError, ValueError):
            disk = {}
        for group, keys in self._written.items():
            disk.setdefault(group, {}).update({k: self.results[group][k] for k in keys if k in self.results.get(group, {})})
        for key, value in self.results.items():
            if key not in disk:
                disk[key] = value
        self.results = disk
        tmp = self.results_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=2) + "\n")
        tmp.replace(self.results_path)

    def record(self, group: str, key: str, value) -> None:
        """Set ``results[group][key]`` and save (only such entries override the file on disk)."""
        self.results.setdefault(group, {})[key] = value
        self._written.setdefault(group, set()).add(key)
        self.save_results()


# --------------------------------------------------------------------------- registry


@dataclass
class Section:
    name: str
    title: str
    fn: Callable[[Context], SectionResult]


#: name → Section, in the order sections run and appear in the output file.
SECTIONS: Dict[str, Section] = {}


def section(name: str, title: str):
    """Register a section function under ``name``."""

    def deco(fn: Callable[[Context], SectionResult]):
        SECTIONS[name] = Section(name, title, fn)
        return fn

    return deco


# --------------------------------------------------------------------------- verification helpers


def tensor_files(folder: Path) -> Dict[str, Path]:
    """Tensor name → shard file of a safetensors checkpoint folder (headers only)."""
    from safetensors import safe_open

    out: Dict[str, Path] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = f
    return out


def _header(files: Dict[str, Path]) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    from safetensors import safe_open

    out = {}
    by_file: Dict[Path, List[str]] = {}
    for k, f in files.items():
        by_file.setdefault(f, []).append(k)
    for f, keys in by_file.items():
        with safe_open(str(f), framework="pt") as h:
            for k in keys:
                s = h.get_slice(k)
                out[k] = (tuple(s.get_shape()), s.get_dtype())
    return out


def _load(files: Dict[str, Path], name: str):
    from safetensors import safe_open

    with safe_open(str(files[name]), framework="pt") as h:
        return h.get_tensor(name)


def verify_linear_merge(
    base: Path, fts: Sequence[Path], weights: Sequence[float], out: Path, sample: Sequence[str], dtype: str = "BF16"
) -> Tuple[bool, List[str]]:
    """Check ``out`` against ``base + Σ w_i (ft_i − base)`` computed in fp32 then cast to bf16.

    All tensors: same names and shapes as the base, dtype ``dtype``. Sampled tensors: max |Δ|,
    fraction of bit-identical elements, fraction within tolerance of the fp32 reference: one bf16 ulp
    at |ref| plus 8·eps32·Σ|terms| (a different but valid fp32 summation order, e.g. the engine's
    ``(1 − Σc)·θ0 + Σ c·θi``, can round to the neighbouring bf16 value, and near-zero results of
    cancelling terms carry an absolute fp32 error).
    Returns (ok, markdown lines).
    """
    import torch

    lines: List[str] = []
    if not out.is_dir():
        return False, [f"Verification: output folder missing ({out})."]
    bf, of = tensor_files(base), tensor_files(out)
    bh, oh = _header(bf), _header(of)
    problems = []
    if set(bh) != set(oh):
        problems.append(f"tensor names differ (missing {sorted(set(bh) - set(oh))[:3]}, extra {sorted(set(oh) - set(bh))[:3]})")
    bad_shape = [k for k in bh if k in oh and oh[k][0] != bh[k][0]]
    bad_dtype = [k for k in oh if oh[k][1] != dtype]
    if bad_shape:
        problems.append(f"{len(bad_shape)} shape mismatches, e.g. {bad_shape[0]}")
    if bad_dtype:
        problems.append(f"{len(bad_dtype)} tensors not {dtype}, e.g. {bad_dtype[0]}: {oh[bad_dtype[0]][1]}")
    try:
        cfg_dtype = json.loads((out / "config.json").read_text()).get("dtype") or json.loads(
            (out / "config.json").read_text()
        ).get("torch_dtype")
    except (OSError, ValueError):
        cfg_dtype = None
    if cfg_dtype != "bfloat16":
        problems.append(f"config.json dtype is {cfg_dtype!r}")

    ftf = [tensor_files(f) for f in fts]
    lines.append("| Sampled tensor | Shape | Max abs diff | Bit-identical | Within tolerance |")
    lines.append("|---|---|---:|---:|---:|")
    ok_sample = True
    for name in sample:
        if name not in of:
            lines.append(f"| `{name}` | — | missing | — | — |")
            ok_sample = False
            continue
        b = _load(bf, name).float()
        ref = b.clone()
        mag = b.abs()  # Σ of the magnitudes of the summed terms, for the fp32 rounding bound
        for w, files in zip(weights, ftf):
            t = _load(files, name).float()
            ref.add_(t - b, alpha=w)
            mag.add_(t.abs() + b.abs(), alpha=abs(w))
            del t
        ref_bf = ref.to(torch.bfloat16)
        o = _load(of, name)
        exact = (o == ref_bf).float().mean().item()
        diff = (o.float() - ref).abs()
        _, exp = torch.frexp(ref)
        tol = torch.ldexp(torch.ones_like(ref), exp - 8)  # one bf16 ulp at |ref|: 2^(e-1-7)
        tol.add_(mag, alpha=8 * torch.finfo(torch.float32).eps)  # + fp32 summation-order error
        within = (diff <= tol).float().mean().item()
        max_abs = (o.float() - ref_bf.float()).abs().max().item()
        ok_sample &= within == 1.0
        lines.append(f"| `{name}` | {tuple(o.shape)} | {max_abs:.3g} | {exact:.4%} | {within:.4%} |")
        del b, ref, ref_bf, o, diff, tol, exp, mag
    ok = not problems and ok_sample
    if problems:
        head = "Verification **FAILED**: " + "; ".join(problems)
    else:
        head = (
            f"Verification {'**OK**' if ok else '**FAILED** (sampled values)'}: the output has the base's "
            f"{len(bh)} tensor names and shapes, all {dtype}, config dtype bfloat16"
        )
    head += (
        f". Sampled tensors compared with `bf16(base + Σ wᵢ·(ftᵢ − base))` computed in fp32 "
        f"(max abs diff against that bf16 reference; tolerance: 1 bf16 ulp + 8·eps32·Σ|terms|):"
    )
    return ok, [head, "", *lines]


# --------------------------------------------------------------------------- sections


@section("summary", "Summary: targets from the issue tracker")
def section_summary(ctx: Context) -> SectionResult:
    """Every section's targets, from results.json (this run's or the last run of that section)."""
    secs = ctx.results.get("sections", {})
    table = ["| Section (measured) | Target | Measured | Result |", "|---|---|---:|---|"]
    for name in SECTIONS:
        if name == "summary" or name not in secs:
            continue
        for t in secs[name].get("targets", []):
            table.append(f"| [{name}](#{_anchor(SECTIONS[name].title)}) ({secs[name]['date']}) | {t['target']} "
                         f"| {t['measured']} | {_pass(t['pass'])} |")
        if secs[name].get("skipped"):
            table.append(f"| {name} ({secs[name]['date']}) | — | not run: {secs[name]['skipped']} | n/a |")
    res = SectionResult(title=SECTIONS["summary"].title, table=table)
    res.runs_text = "collected from the sections below"
    res.intro = (
        "Each row comes from its section below, which has the commands, the runs and the details. The machine "
        "is a shared 2-core VM: other jobs ran during these measurements (each section states the load average), "
        "so absolute times are noisy; ratios are measured within one run of one section."
    )
    res.data["loadavg"] = None
    return res


def _anchor(title: str) -> str:
    """GitHub's anchor for a markdown heading."""
    return re.sub(r"[^\w\- ]", "", title.lower()).strip().replace(" ", "-")


@section("floor", "IO floor")
def section_floor(ctx: Context) -> SectionResult:
    """Read all tensors of BASE and 3 finetunes and write one model with plain safetensors."""
    base, fts = ctx.suite()
    out = ctx.output("floor")
    m = ctx.measure(ctx.floor_cmd(base, fts, out), [base, *fts], "floor")
    ctx._record_floor(ctx.layers, m)
    if not ctx.args.keep_outputs:
        shutil.rmtree(ctx.out_dir / "floor", ignore_errors=True)
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    res = SectionResult(
        title="IO floor",
        intro=(
            "The least a merge of 4 inputs into 1 output can cost with plain safetensors IO: "
            "`tests/bench/io_floor.py` reads every tensor of the 3 finetunes (`safe_open` per shard, "
            "`get_tensor`, discard) and copies the base shard by shard with `save_file`. No arithmetic. "
            "Other sections report their wall time relative to this one."
        ),
        rows=[Row(ctx.display(m.cmd), m, m.median_wall_s)],
        legend=ctx.model_legend(),
    )
    if m.ok:
        moved = 5 * size
        res.notes.append(
            f"Moves {4 * size / GB:.2f} GB in and {size / GB:.2f} GB out: "
            f"{moved / GB / m.median_wall_s:.2f} GB/s overall. Peak RSS includes the mmapped pages "
            "of the open shard and one shard's tensors held for `save_file`."
        )
        gen = ctx.results.get("synth", {}).get(f"L{ctx.layers}")
        if gen:
            res.notes.append(
                f"Generating the {gen.get('n_models', 4)} synthetic inputs took {gen['seconds']:.0f} s "
                f"({gen['date']}); they are cached in `bench_work/models`."
            )
    return res


@section("apply", "`hf-taskarith apply`: dense task vectors (issue 2)")
def section_apply(ctx: Context) -> SectionResult:
    """``hf-taskarith apply`` of 3 full finetunes onto the base, bf16 output, checked on a sample."""
    base, fts = ctx.suite()
    floor = ctx.floor()
    out = ctx.output("apply")
    weights = [0.5, 0.3, 0.2]
    cmd = [str(ctx.bin / "hf-taskarith"), "apply", "--base", str(base)]
    for ft, w in zip(fts, weights):
        cmd += ["--task", f"{ft}:{w}"]
    cmd += ["--out", str(out), "--dtype", "bfloat16", "--overwrite"]
    m = ctx.measure(cmd, [base, *fts], "apply")
    res = SectionResult(
        title=SECTIONS["apply"].title,
        intro=(
            "θ = BASE + 0.5·(FT1 − BASE) + 0.3·(FT2 − BASE) + 0.2·(FT3 − BASE), written as bf16 "
            "through the CLI (imports, reads, fp32 math, writes, config copy). The output folder is "
            "deleted (untimed) before each run."
        ),
        rows=[Row(ctx.display(cmd), m, floor)],
        legend=ctx.model_legend(),
    )
    if floor is None:
        res.notes.append("The IO floor could not be measured, so there is no ratio.")
    if m.ok:
        n = ctx.layers
        sample = [
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.q_proj.weight",
            f"model.layers.{n // 2}.mlp.down_proj.weight",
            f"model.layers.{n - 1}.input_layernorm.weight",
            "lm_head.weight",
        ]
        ok, lines = verify_linear_merge(base, fts, weights, out, sample)
        res.notes.append("\n".join(lines))
        res.data["verify_failed"] = not ok
        rss = m.peak_rss_bytes / GB
        res.data["targets"] = [
            {"target": f"`apply` peak RSS ≤ {RSS_TARGET_GB:g} GB", "measured": f"{rss:.2f} GB", "pass": rss <= RSS_TARGET_GB},
            {"target": "`apply` wall within a small factor of the IO floor", "measured":
             f"{m.median_wall_s / floor:.2f}× ({m.median_wall_s:.1f} s vs {floor:.1f} s)" if floor else "—", "pass": None},
        ]
    if not ctx.args.keep_outputs:
        shutil.rmtree(ctx.out_dir / "apply", ignore_errors=True)
    return res


# --------------------------------------------------------------------------- methods vs mergekit

#: mergekit's version the ``methods`` section compares against (and installs when none is found).
MERGEKIT_VERSION = "0.1.5"
METHOD_WEIGHTS = (0.5, 0.3, 0.2)
METHOD_DENSITY = 0.2
#: (method, density or None); the order of the table.
METHODS_COMPARED = (("task_arithmetic", None), ("ties", METHOD_DENSITY), ("dare_ties", METHOD_DENSITY))
#: Targets from the issue tracker: ours / mergekit wall time (and RSS for task_arithmetic).
WALL_TARGETS = {"task_arithmetic": 0.4, "ties": 0.1, "dare_ties": 0.2}
RSS_RATIO_TARGETS = {"task_arithmetic": 0.4}
RSS_TARGET_GB = 2.0
TIES_OVER_TA_TARGET = 3.0
#: Deterministic methods: an element matches when |ours − mergekit| ≤ MATCH_ULPS bf16 ulps at the
#: inputs' magnitude; the section verifies when at least MATCH_FRACTION of all elements do.
MATCH_ULPS = 4
MATCH_FRACTION = 0.999
#: dare_ties: mean |merged − base| of ours within this relative distance of mergekit's.
DARE_MEAN_TOL = 0.10


def mergekit_yaml(ctx: Context) -> Tuple[Optional[Path], str]:
    """The ``mergekit-yaml`` to compare against, and where it comes from.

    ``.venv-mergekit`` (built by ``make test``; used once its ``.installed`` stamp exists), else
    ``bench_work/mk``, else ``bench_work/mk`` is created now (``python3 -m venv`` + pip install
    torch==2.13.0 and mergekit==0.1.5; log in ``bench_work/mk-install.log``). (None, why) when that fails.
    """
    repo_venv = REPO / ".venv-mergekit"
    if (repo_venv / "bin" / "mergekit-yaml").exists() and (repo_venv / ".installed").exists():
        return repo_venv / "bin" / "mergekit-yaml", "`.venv-mergekit`"
    mk = ctx.work / "mk"
    exe = mk / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe, "`bench_work/mk`"
    log = ctx.work / "mk-install.log"
    ctx.work.mkdir(parents=True, exist_ok=True)
    print(f"[bench] installing mergekit {MERGEKIT_VERSION} into {mk} (log: {log})", file=sys.stderr, flush=True)
    py = str(mk / "bin" / "python")
    with open(log, "w") as fh:
        steps = [
            [shutil.which("python3") or sys.executable, "-m", "venv", str(mk)],
            [py, "-m", "pip", "install", "-q", "torch==2.13.0"],
            [py, "-m", "pip", "install", "-q", f"mergekit=={MERGEKIT_VERSION}"],
        ]
        for step in steps:
            rc = subprocess.run(step, stdout=fh, stderr=subprocess.STDOUT).returncode
            if rc != 0 and "torch==2.13.0" in step:  # no such wheel here: let pip choose
                rc = subprocess.run([py, "-m", "pip", "install", "-q", "torch"], stdout=fh, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                return None, f"installing mergekit failed at `{' '.join(step[-3:])}` (see {log})"
    return (exe, "`bench_work/mk` (installed by this run)") if exe.exists() else (None, f"no mergekit-yaml after install (see {log})")


def _pkg_versions(python: Path) -> str:
    code = "import importlib.metadata as m; print('mergekit', m.version('mergekit') + ', torch', m.version('torch'))"
    r = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else "versions unknown"


def mergekit_config(method: str, base: Path, fts: Sequence[Path], weights: Sequence[float], density: Optional[float]) -> str:
    """One mergekit YAML config, run unchanged by both tools."""
    lines = ["models:"]
    for ft, w in zip(fts, weights):
        lines += [f"  - model: {ft}", "    parameters:", f"      weight: {w}"]
        if density is not None:
            lines.append(f"      density: {density}")
    lines += [f"base_model: {base}", f"merge_method: {method}", "dtype: bfloat16", ""]
    return "\n".join(lines)


def measure_adaptive(ctx: Context, cmd: Sequence[str], warm: Sequence[Path], key: str) -> _measure.Measurement:
    """One run; then up to ``--repeats`` in all, or ``--repeats-slow`` in all when the first run took
    longer than ``--slow-s`` (mergekit's TIES takes minutes)."""
    m = ctx.measure(cmd, warm, key, repeats=1)
    if not m.ok:
        return m
    slow = m.runs[0].wall_s > ctx.args.slow_s
    total = max(1, min(ctx.repeats, ctx.args.repeats_slow) if slow else ctx.repeats)
    if total > 1:
        if slow:
            print(f"[bench]   first run > {ctx.args.slow_s:.0f}s: {total} runs in all (--repeats-slow)", file=sys.stderr)
        more = ctx.measure(cmd, warm, key, repeats=total - 1)
        m.runs += more.runs
        m.error = more.error
    return m


def compare_merges(
    base: Path, fts: Sequence[Path], ours: Path, theirs: Path, ulps: int = MATCH_ULPS, density: Optional[float] = None
) -> dict:
    """Compare two merged checkpoints on every tensor.

    Names, shapes and dtypes; max |ours − theirs|; the fraction of bit-identical elements and of
    elements within ``ulps`` bf16 ulps at the inputs' magnitude (max over base and finetunes of
    |x|; an ulp of bf16 at |x| = 2^(e−8) for |x| = m·2^e, 0.5 ≤ m < 1); mean |merged − base| of each.

    With ``density`` (a top-k trim keeping k = int(density·n) entries of each τ_i), also counts the
    elements where some |τ_i| equals its k-th largest magnitude: both tools keep exactly k entries,
    but break ties at the threshold differently (lowest index vs. ``argsort`` order), and the
    synthetic deltas take few distinct values, so such elements may legitimately differ; the
    agreement is reported on the other elements too.
    """
    import torch

    bf, of, tf = tensor_files(base), tensor_files(ours), tensor_files(theirs)
    ftf = [tensor_files(f) for f in fts]
    oh, th = _header(of), _header(tf)
    res = {
        "missing_ours": sorted(set(bf) - set(of)), "missing_theirs": sorted(set(bf) - set(tf)),
        "extra_ours": sorted(set(of) - set(bf)), "extra_theirs": sorted(set(tf) - set(bf)),
        "shape_or_dtype_mismatch": [], "n_tensors": 0, "n_elements": 0, "max_abs_diff": 0.0,
        "max_abs_diff_tensor": None, "bit_identical": 0, "within_tol": 0, "worst_within": (1.0, None),
        "tied": 0, "within_tol_untied": 0,
        "sum_abs_delta_ours": 0.0, "sum_abs_delta_theirs": 0.0, "dtypes": sorted({v[1] for v in oh.values()} | {v[1] for v in th.values()}),
    }
    for name in [k for k in bf if k in of and k in tf]:
        if oh[name] != th[name]:
            res["shape_or_dtype_mismatch"].append(f"{name}: ours {oh[name]}, mergekit {th[name]}")
            continue
        b = _load(bf, name)
        mag = b.float().abs()
        for files in ftf:
            torch.maximum(mag, _load(files, name).float().abs(), out=mag)
        o, t = _load(of, name), _load(tf, name)
        n = o.numel()
        res["bit_identical"] += int((o == t).sum())
        of32, tf32, bf32 = o.float(), t.float(), b.float()
        res["sum_abs_delta_ours"] += float((of32 - bf32).abs().sum(dtype=torch.float64))
        res["sum_abs_delta_theirs"] += float((tf32 - bf32).abs().sum(dtype=torch.float64))
        diff = of32.sub_(tf32).abs_()
        del tf32, bf32
        mx = float(diff.max()) if n else 0.0
        if mx > res["max_abs_diff"]:
            res["max_abs_diff"], res["max_abs_diff_tensor"] = mx, name
        _, exp = torch.frexp(mag.clamp_(min=torch.finfo(torch.bfloat16).tiny))
        tol = torch.ldexp(torch.full_like(mag, float(ulps)), exp - 8)
        ok_el = diff <= tol
        within = int(ok_el.sum())
        res["within_tol"] += within
        if density is not None and n:
            k = max(1, int(density * n))
            tied = torch.zeros(b.shape, dtype=torch.bool)
            for files in ftf:
                tau = _load(files, name).float().sub_(b.float()).abs_().reshape(-1)
                thr = torch.kthvalue(tau, n - k + 1).values
                tied |= (tau == thr).view(b.shape)
                del tau
            res["tied"] += int(tied.sum())
            res["within_tol_untied"] += int((ok_el & ~tied).sum())
            del tied
        if n and within / n < res["worst_within"][0]:
            res["worst_within"] = (within / n, name)
        res["n_tensors"] += 1
        res["n_elements"] += n
        del b, mag, o, t, diff, tol, exp, ok_el
    return res


def _fmt_s(m: _measure.Measurement) -> str:
    return f"{m.median_wall_s:.1f}" if m.ok else "**FAILED**"


def _fmt_gb(m: _measure.Measurement) -> str:
    return f"{m.peak_rss_bytes / GB:.2f}" if m.ok else "—"


def _pass(ok: Optional[bool]) -> str:
    return "n/a" if ok is None else ("**PASS**" if ok else "**MISS**")


@section("methods", f"Merge methods vs mergekit {MERGEKIT_VERSION}")
def section_methods(ctx: Context) -> SectionResult:
    """task_arithmetic, ties and dare_ties from one mergekit YAML config each, run unchanged by
    ``mergekit-yaml`` and ``hf-taskarith merge``: wall time, peak RSS, and output agreement."""
    t_section = time.perf_counter()
    base, fts = ctx.suite()
    floor = ctx.floor()
    warm = [base, *fts]
    res = SectionResult(title=SECTIONS["methods"].title, legend=ctx.model_legend())
    mk_exe, mk_from = mergekit_yaml(ctx)
    cfg_dir = ctx.work / "configs"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    ours_exe = ctx.bin / "hf-taskarith"
    per: Dict[str, dict] = {}
    verify_failed = False
    verify_lines: List[str] = []
    for method, density in METHODS_COMPARED:
        cfg = cfg_dir / f"{method}.yml"
        cfg.write_text(mergekit_config(method, base, fts, METHOD_WEIGHTS, density))
        ctx._placeholders[str(cfg)] = f"{method}.yml"
        out_ours = ctx.output("methods/ours", method)
        out_mk = ctx.output("methods/mergekit", method)
        cmd_ours = [str(ours_exe), "-q", "merge", str(cfg), "--out", str(out_ours), "--overwrite"]
        m_ours = measure_adaptive(ctx, cmd_ours, warm, "methods/ours")
        res.rows.append(Row(ctx.display(cmd_ours), m_ours, floor, note=f"ours, {method}"))
        if mk_exe is not None:
            cmd_mk = [str(mk_exe), str(cfg), str(out_mk), "--no-copy-tokenizer", "--quiet"]
            m_mk = measure_adaptive(ctx, cmd_mk, warm, "methods/mergekit")
        else:
            cmd_mk = ["mergekit-yaml", str(cfg), str(out_mk), "--no-copy-tokenizer", "--quiet"]
            m_mk = _measure.Measurement(cmd=cmd_mk, error=f"mergekit unavailable: {mk_from}")
        res.rows.append(Row(ctx.display(cmd_mk), m_mk, floor, note=f"mergekit, {method}"))
        per[method] = {"ours": m_ours, "mk": m_mk, "cmd_ours": ctx.display(cmd_ours), "cmd_mk": ctx.display(cmd_mk)}
        if m_ours.ok and m_mk.ok:
            print(f"[bench] comparing {method} outputs (all tensors)", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            c = compare_merges(base, fts, out_ours, out_mk, density=density if method == "ties" else None)
            per[method]["compare"] = c
            per[method]["compare_s"] = time.perf_counter() - t0
            ok, line = _verdict(method, c)
            verify_failed |= not ok
            verify_lines.append(line)
        if not ctx.args.keep_outputs:
            shutil.rmtree(ctx.out_dir / "methods", ignore_errors=True)

    # ---- timing table
    ta = per["task_arithmetic"]["ours"]
    table = [
        "| Method | Ours wall (s) | Ours peak RSS (GB) | mergekit wall (s) | mergekit peak RSS (GB) "
        "| Wall ours / mergekit | RSS ours / mergekit | Ours wall / floor | Ours wall / ours task_arithmetic | Runs (ours / mergekit) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    targets: List[Tuple[str, str, Optional[bool]]] = []
    summary = {}
    for method, _ in METHODS_COMPARED:
        o, k = per[method]["ours"], per[method]["mk"]
        both = o.ok and k.ok
        wr = o.median_wall_s / k.median_wall_s if both else None
        rr = o.peak_rss_bytes / k.peak_rss_bytes if both else None
        fl = o.median_wall_s / floor if o.ok and floor else None
        vs_ta = o.median_wall_s / ta.median_wall_s if o.ok and ta.ok else None
        summary[method] = {"wall_ratio": wr, "rss_ratio": rr, "wall_over_floor": fl, "wall_over_ours_ta": vs_ta}
        f2 = lambda x, d=2: "—" if x is None else f"{x:.{d}f}"  # noqa: E731
        table.append(
            f"| `{method}` | {_fmt_s(o)} | {_fmt_gb(o)} | {_fmt_s(k)} | {_fmt_gb(k)} | {f2(wr, 3)} | {f2(rr)} "
            f"| {f2(fl)} | {f2(vs_ta)} | {len(o.runs)} / {len(k.runs)} |"
        )
        if method in WALL_TARGETS:
            t = WALL_TARGETS[method]
            targets.append((f"`{method}` wall ≤ {t}× mergekit", "—" if wr is None else f"{wr:.3f}×", None if wr is None else wr <= t))
        if method in RSS_RATIO_TARGETS:
            t = RSS_RATIO_TARGETS[method]
            targets.append((f"`{method}` peak RSS ≤ {t}× mergekit", "—" if rr is None else f"{rr:.2f}×", None if rr is None else rr <= t))
    for method, _ in METHODS_COMPARED:
        o = per[method]["ours"]
        targets.append(
            (f"`{method}` ours peak RSS ≤ {RSS_TARGET_GB:g} GB", _fmt_gb(o) + " GB" if o.ok else "—",
             None if not o.ok else o.peak_rss_bytes / GB <= RSS_TARGET_GB)
        )
    v = summary["ties"]["wall_over_ours_ta"]
    targets.append((f"ours `ties` wall ≤ {TIES_OVER_TA_TARGET:g}× ours `task_arithmetic`", "—" if v is None else f"{v:.2f}×",
                    None if v is None else v <= TIES_OVER_TA_TARGET))
    table += ["", "| Target (issue tracker) | Measured | Result |", "|---|---:|---|"]
    table += [f"| {name} | {val} | {_pass(ok)} |" for name, val, ok in targets]
    res.table = table

    res.runs_text = (
        f"median of up to {ctx.repeats} runs per command ({ctx.args.repeats_slow} when the first run exceeds "
        f"{ctx.args.slow_s:.0f} s; counts in the table)"
    )
    example = (cfg_dir / "ties.yml").read_text()
    for ph in sorted(ctx._placeholders, key=len, reverse=True):
        example = example.replace(ph, ctx._placeholders[ph])
    cmd_o, cmd_k = per["ties"]["cmd_ours"], per["ties"]["cmd_mk"]
    res.intro = (
        f"One mergekit YAML config per method — the 3 finetunes with weights {', '.join(map(str, METHOD_WEIGHTS))}"
        f" (and `density: {METHOD_DENSITY}` for `ties` and `dare_ties`), `base_model: BASE`, `dtype: bfloat16`, "
        "no other parameters — run unchanged by both tools:\n\n"
        f"- ours: `{cmd_o}`\n- mergekit {MERGEKIT_VERSION} ({mk_from}"
        + (f"; {_pkg_versions(mk_exe.parent / 'python')}" if mk_exe else "")
        + f"): `{cmd_k}` (its defaults otherwise: CPU, no `--lazy-unpickle`, 5B-parameter shards)\n\n"
        "Both write one bf16 safetensors model; the output folder is deleted (untimed) before each run. "
        f"Config for `ties` (the others differ in `merge_method` and, for `task_arithmetic`, have no `density`):\n\n"
        f"```yaml\n{example.rstrip()}\n```"
    )
    if floor is None:
        res.notes.append("The IO floor could not be measured, so there is no floor ratio.")
    res.notes.append(
        "Ours runs these three methods through the fused CPU kernels (`hf_taskarith/kernels.py`; compiled on first "
        "use and cached in `~/.cache/hf_taskarith/kernels`, so a first-ever run adds the compile time, ~10 s per "
        "method, which the median of the runs leaves out). Ours fsyncs every shard before renaming the output into "
        "place (its wall time includes waiting for the disk); mergekit leaves its output in the page cache."
    )
    if verify_lines:
        res.notes.append(
            "Output agreement, every tensor of the model. `task_arithmetic` and `ties` are deterministic; "
            f"an element matches when |ours − mergekit| ≤ {MATCH_ULPS} bf16 ulps at the inputs' magnitude "
            "(max |x| over base and finetunes; mergekit does its arithmetic in bf16, we do it in fp32 and round once), "
            f"and the method verifies when ≥ {MATCH_FRACTION:.1%} of the elements match. For `ties` that fraction "
            "is taken over the elements where no |τᵢ| equals its tensor's top-k threshold: both tools keep exactly "
            "k = int(density·n) entries per τᵢ but break ties at the threshold differently (we keep the lowest "
            "indices, mergekit whatever `argsort` returns), and the synthetic deltas are multiples of one bf16 ulp "
            "of the base, so thousands of entries share the threshold value and a different subset of them is "
            "kept (which can also flip that element's sign election). `dare_ties` draws its random "
            "masks with a different RNG, so only names, shapes and dtypes are compared, and mean |merged − base| over "
            f"all elements must be within {DARE_MEAN_TOL:.0%} of mergekit's.\n\n" + "\n".join(verify_lines)
        )
    total = time.perf_counter() - t_section
    res.notes.append(
        f"The section took {total / 60:.1f} min in all (runs, warm-ups, output comparisons"
        + (f", {sum(p.get('compare_s', 0) for p in per.values()):.0f} s of them comparing outputs" if verify_lines else "")
        + ")."
    )
    res.data.update(
        {
            "verify_failed": verify_failed,
            "mergekit": mk_from,
            "summary": summary,
            "targets": [{"target": n, "measured": v, "pass": ok} for n, v, ok in targets],
            "compare": {m: p.get("compare") for m, p in per.items()},
            "section_s": total,
        }
    )
    return res


def _verdict(method: str, c: dict) -> Tuple[bool, str]:
    """(ok, markdown bullet) for one method's ``compare_merges`` result."""
    layout_problems = []
    for key, what in (("missing_ours", "missing in ours"), ("missing_theirs", "missing in mergekit's"),
                      ("extra_ours", "extra in ours"), ("extra_theirs", "extra in mergekit's")):
        if c[key]:
            layout_problems.append(f"{len(c[key])} tensors {what} (e.g. `{c[key][0]}`)")
    if c["shape_or_dtype_mismatch"]:
        layout_problems.append(f"{len(c['shape_or_dtype_mismatch'])} shape/dtype mismatches (e.g. {c['shape_or_dtype_mismatch'][0]})")
    layout = (
        f"same {c['n_tensors']} tensor names, shapes and dtypes ({', '.join(c['dtypes'])})"
        if not layout_problems else "; ".join(layout_problems)
    )
    n = max(c["n_elements"], 1)
    mean_o, mean_t = c["sum_abs_delta_ours"] / n, c["sum_abs_delta_theirs"] / n
    rel = abs(mean_o - mean_t) / mean_t if mean_t else float("inf")
    means = f"mean |merged − base| {mean_o:.4g} (ours) vs {mean_t:.4g} (mergekit), {rel:.2%} apart"
    if method == "dare_ties":
        ok = not layout_problems and rel <= DARE_MEAN_TOL
        return ok, f"- `{method}`: {'**OK**' if ok else '**FAILED**'} — {layout}; {means} (limit {DARE_MEAN_TOL:.0%})."
    within = c["within_tol"] / n
    untied_n = c["n_elements"] - c["tied"]
    within_untied = c["within_tol_untied"] / untied_n if untied_n else 1.0
    judged = within_untied if c["tied"] else within
    ok = not layout_problems and judged >= MATCH_FRACTION
    worst = c["worst_within"]
    return ok, (
        f"- `{method}`: {'**OK**' if ok else '**FAILED**'} — {layout}; {c['n_elements'] / 1e9:.3f}B elements: "
        f"{c['bit_identical'] / n:.4%} bit-identical, {within:.4%} within {MATCH_ULPS} ulps"
        + (f" (lowest: {worst[0]:.4%} in `{worst[1]}`)" if worst[1] else "")
        + (
            f"; {c['tied'] / n:.2%} of the elements have some |τᵢ| tied with its top-k threshold, and of the "
            f"others {within_untied:.4%} are within {MATCH_ULPS} ulps"
            if c["tied"] else ""
        )
        + f"; max abs diff {c['max_abs_diff']:.3g}"
        + (f" (in `{c['max_abs_diff_tensor']}`)" if c["max_abs_diff_tensor"] else "")
        + f"; {means}."
    )


# --------------------------------------------------------------------------- scaling (issue 9)

#: Peak RSS may grow by less than this fraction when the model's depth doubles (issue 9).
SCALING_RSS_GROWTH = 0.10


def _method_cmd(ctx: Context, method: str, base: Path, fts: Sequence[Path], out: Path, tag: str) -> List[str]:
    cfg_dir = ctx.work / "configs"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    density = METHOD_DENSITY if method != "task_arithmetic" else None
    cfg = cfg_dir / f"{method}_{tag}.yml"
    cfg.write_text(mergekit_config(method, base, fts, METHOD_WEIGHTS, density))
    ctx._placeholders[str(cfg)] = f"{method}.yml"
    return [str(ctx.bin / "hf-taskarith"), "-q", "merge", str(cfg), "--out", str(out), "--overwrite"]


@section("scaling", "Peak memory when the model doubles (issue 9)")
def section_scaling(ctx: Context) -> SectionResult:
    """Ours at 1x (16 layers) and 2x (32 layers): apply and the three methods, peak RSS growth."""
    small, big = ctx.layers, 2 * ctx.layers
    suites = {small: ctx.suite(small), big: ctx.suite(big)}
    ctx._placeholders[str(suites[small][0])] = "BASE"
    jobs = [j.strip() for j in ctx.args.scaling_jobs.split(",") if j.strip()]
    bad = [j for j in jobs if j not in ("apply", "task_arithmetic", "ties", "dare_ties")]
    if bad:
        raise ValueError(f"--scaling-jobs: unknown {bad}; use apply, task_arithmetic, ties, dare_ties")
    per: Dict[Tuple[str, int], _measure.Measurement] = {}
    for job in jobs:
        for layers in (small, big):
            base, fts = suites[layers]
            out = ctx.output("scaling", f"{job}_L{layers}")
            if job == "apply":
                cmd = [str(ctx.bin / "hf-taskarith"), "apply", "--base", str(base)]
                for ft, w in zip(fts, METHOD_WEIGHTS):
                    cmd += ["--task", f"{ft}:{w}"]
                cmd += ["--out", str(out), "--dtype", "bfloat16", "--overwrite"]
            else:
                cmd = _method_cmd(ctx, job, base, fts, out, f"L{layers}")
            per[(job, layers)] = ctx.measure(cmd, [base, *fts], "scaling", repeats=ctx.repeats)
    if not ctx.args.keep_outputs:
        shutil.rmtree(ctx.out_dir / "scaling", ignore_errors=True)
    size = {L: sum(f.stat().st_size for f in suites[L][0].glob("*.safetensors")) for L in (small, big)}
    table = [
        f"| Command | Wall {small} layers (s) | Wall {big} layers (s) | Peak RSS {small} layers (GB) "
        f"| Peak RSS {big} layers (GB) | RSS growth | Target < {SCALING_RSS_GROWTH:.0%} | Runs |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    growth = {}
    for job in jobs:
        a, b = per[(job, small)], per[(job, big)]
        g = b.peak_rss_bytes / a.peak_rss_bytes - 1 if a.ok and b.ok else None
        growth[job] = g
        label = "`hf-taskarith apply`" if job == "apply" else f"`hf-taskarith merge` {job}"
        table.append(
            f"| {label} | {_fmt_s(a)} | {_fmt_s(b)} | {_fmt_gb(a)} | {_fmt_gb(b)} | "
            f"{'—' if g is None else f'{g:+.1%}'} | {_pass(None if g is None else g < SCALING_RSS_GROWTH)} | {len(b.runs)} |"
        )
    res = SectionResult(
        title=SECTIONS["scaling"].title,
        intro=(
            f"The same commands as the `apply` and `methods` sections (weights {', '.join(map(str, METHOD_WEIGHTS))}, "
            f"density {METHOD_DENSITY}, bf16 output) on the {small}-layer model ({size[small] / GB:.2f} GB per checkpoint) "
            f"and on the same model with {big} layers ({size[big] / GB:.2f} GB per checkpoint; `tests/bench/synth.py "
            f"--layers {big}`). Both have the same largest tensors (embeddings and `lm_head`, 32000×2048), so a "
            "streaming engine's peak should not move. `--scaling-jobs` picks the commands (default: all four)."
        ),
        table=table,
        legend=ctx.model_legend(),
    )
    res.runs_text = f"median of up to {ctx.repeats} runs (counts in the table)"
    for (job, layers), m in per.items():
        if not m.ok:
            res.rows.append(Row(ctx.display(m.cmd), m))
    res.data["targets"] = [
        {"target": f"peak RSS growth < {SCALING_RSS_GROWTH:.0%} from {small} to {big} layers: {job}",
         "measured": "—" if g is None else f"{g:+.1%}", "pass": None if g is None else g < SCALING_RSS_GROWTH}
        for job, g in growth.items()
    ]
    res.data.update({"growth": growth, "walls": {f"{j}_L{l}": m.median_wall_s for (j, l), m in per.items()},
                     "rss": {f"{j}_L{l}": m.peak_rss_bytes for (j, l), m in per.items()}})
    return res


# --------------------------------------------------------------------------- top-k (issue 9)


@section("topk", "Exact top-k threshold: alternatives (issue 9)")
def section_topk(ctx: Context) -> SectionResult:
    """``topk_bench.py`` in a child process: kthvalue, topk, sort, radix select, ours."""
    out = ctx.work / "topk.json"
    cmd = [ctx.python, str(HERE / "topk_bench.py"), "--rows", "5632", "--cols", "2048", "--density", str(METHOD_DENSITY),
           "--repeats", str(max(3, ctx.repeats + 2)), "--json", str(out)]
    ctx._placeholders[str(out)] = "bench_work/topk.json"
    m = ctx.measure(cmd, [], "topk", repeats=1)
    res = SectionResult(title=SECTIONS["topk"].title)
    res.runs_text = "interleaved runs, median per candidate"
    if not m.ok:
        res.rows.append(Row(ctx.display(cmd), m))
        return res
    r = json.loads(out.read_text())
    labels = list(r["inputs"])
    cands = list(r["inputs"][labels[0]]["median_s"])
    table = ["| Candidate | " + " | ".join(f"{lb}: median (s) | exact" for lb in labels) + " |",
             "|---|" + "---:|---|" * len(labels)]
    for c in cands:
        cells = []
        for lb in labels:
            v = r["inputs"][lb]
            cells += [f"{v['median_s'][c]:.3f}", "yes" if v["exact"][c] else "**NO**"]
        table.append(f"| {c} | " + " | ".join(cells) + " |")
    cells = []
    for lb in labels:
        v = r["inputs"][lb]
        cells += [f"{v['abs_pass_median_s']:.3f}", "—"]
    table.append("| the `abs` pass before any of them | " + " | ".join(cells) + " |")
    cells = []
    for lb in labels:
        v = r["inputs"][lb]
        cells += [f"{v['topk_mask_median_s']:.3f}", "yes" if v["topk_mask_exact"] else "**NO**"]
    table.append("| `methods.topk_mask` (abs + threshold + exactly-k mask) | " + " | ".join(cells) + " |")
    res.table = table
    v0 = r["inputs"][labels[-1]]
    res.intro = (
        f"`{ctx.display(cmd)}`: the k-th largest |τ| of one {r['shape'][0]}×{r['shape'][1]} float32 tensor "
        f"(an MLP matrix of the benchmark model; n = {v0['n']:,}, k = int({r['density']}·n) = {v0['k']:,}), "
        f"torch {ctx.machine['torch']} with {r['threads']} threads. Every candidate must return the same float32 bits "
        "as `torch.kthvalue` (\"exact\"). Inputs: an fp32 Gaussian, and a realistic delta (bf16 finetune − bf16 "
        f"base: few distinct values, {v0['tied_at_threshold']:,} entries tied at the threshold). "
        "`topk_mask` must keep exactly k entries, all ≥ every dropped one, ties at the threshold by lowest index. "
        "See the docstring of `tests/bench/topk_bench.py` for the algorithms."
    )
    fastest = {lb: min(r["inputs"][lb]["median_s"], key=r["inputs"][lb]["median_s"].get) for lb in labels}
    res.notes.append("Fastest exact candidate: " + "; ".join(f"{lb}: {c}" for lb, c in fastest.items()) + ".")
    res.data["topk"] = r
    return res


# --------------------------------------------------------------------------- adapters (issue 4)

ADAPTER_SPEEDUP_TARGET = 100.0


def _last_json(m: _measure.Measurement) -> List[dict]:
    out = []
    for run in m.runs:
        for line in reversed(run.stdout_tail.splitlines()):
            if line.startswith("{"):
                out.append(json.loads(line))
                break
    return out


@section("adapter", "LoRA-native svd merge vs PEFT `add_weighted_adapter(svd)` (issue 4)")
def section_adapter(ctx: Context) -> SectionResult:
    """4 adapters, r=16, Llama-7B module shapes: PEFT svd on 1 layer, ours on 1 and N layers."""
    import statistics

    script = HERE / "adapter_bench.py"
    n_big = ctx.args.adapter_layers
    roots = {1: ctx.work / "adapters" / "L1", n_big: ctx.work / "adapters" / f"L{n_big}"}
    for layers, root in roots.items():
        subprocess.run([ctx.python, str(script), "make", str(root), "--layers", str(layers)], check=True)
        ctx._placeholders[str(root)] = f"ADAPTERS_L{layers}"
    outs = ctx.out_dir / "adapter_keep"
    shutil.rmtree(outs, ignore_errors=True)
    outs.mkdir(parents=True)
    runs: List[Tuple[str, str, int, _measure.Measurement]] = []

    def run(label: str, kind: str, layers: int, cmd: List[str], repeats: int, env=None) -> _measure.Measurement:
        m = ctx.measure(cmd, [roots[layers]], "adapter", repeats=repeats, env_extra=env)
        runs.append((label, kind, layers, m))
        return m

    peft_out, peft_thin_out, ours_out = outs / "peft", outs / "peft_thin", outs / "ours"
    for p in (peft_out, peft_thin_out, ours_out):
        ctx._placeholders[str(p)] = "OUT"
    m_peft = run("PEFT `add_weighted_adapter(combination_type=\"svd\", svd_rank=16)` (its default `svd_full_matrices=True`)",
                 "peft", 1, [ctx.python, str(script), "peft", str(roots[1]), str(peft_out)], 1)
    if ctx.args.adapter_peft_thin:
        run("PEFT, same with `svd_full_matrices=False`", "peft", 1,
            [ctx.python, str(script), "peft", str(roots[1]), str(peft_thin_out), "--no-full-matrices"], 1)
    m_ours1 = run("ours: `AdapterMerge(mode=\"svd\", rank=16).save_pretrained` (reads adapters, writes the adapter)",
                  "ours", 1, [ctx.python, str(script), "ours", str(roots[1]), str(ours_out)], ctx.repeats)
    run("ours, same", "ours", n_big,
        [ctx.python, str(script), "ours", str(roots[n_big]), str(outs / "ours_big")], ctx.repeats)
    # Many small LAPACK calls: on an oversubscribed machine OpenMP's second thread mostly waits.
    run("ours, same, `OMP_NUM_THREADS=1`", "ours", n_big,
        [ctx.python, str(script), "ours", str(roots[n_big]), str(outs / "ours_big1")], ctx.repeats,
        env={"OMP_NUM_THREADS": "1"})
    # the whole CLI process on a recipe
    for layers, root in roots.items():
        rec = ctx.work / "configs" / f"adapter_svd_L{layers}.yaml"
        rec.parent.mkdir(parents=True, exist_ok=True)
        rec.write_text(
            f"base: {root / 'base'}\nmethod: task_arithmetic\ntasks:\n"
            + "".join(f"  - adapter: {root / f'ad{k}'}\n    weight: {w}\n" for k, w in enumerate((0.4, 0.3, 0.2, 0.1), 1))
            + "output: {format: adapter, mode: svd, rank: 16}\n"
        )
        ctx._placeholders[str(rec)] = f"adapter_svd_L{layers}.yaml"
        run("ours, whole CLI process on a recipe (`output: {format: adapter, mode: svd, rank: 16}`)", "cli", layers,
            [str(ctx.bin / "hf-taskarith"), "-q", "merge", str(rec), "--out", str(ctx.output("adapter", f"cli{layers}")),
             "--overwrite"], ctx.repeats)

    table = [
        "| Merge | Layers (modules) | Runs | Merge call (s) | Per layer (s) | Process wall (s) | Process peak RSS (GB) "
        "| RSS added by the call (GB) | PEFT per-layer time / this |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    peft_js = _last_json(m_peft) if m_peft.ok else []
    peft_layer_s = peft_js[0]["per_layer_s"] if peft_js else None
    summary = []
    for label, kind, layers, m in runs:
        js = _last_json(m) if m.ok else []
        if kind == "cli":
            call = per_layer = None
            per_layer = m.median_wall_s / layers if m.ok else None
        else:
            call = statistics.median(j["merge_s"] for j in js) if js else None
            per_layer = call / layers if call is not None else None
        added = max(j["maxrss_gb"] - j["rss_before_gb"] for j in js) if js else None
        speed = peft_layer_s / per_layer if peft_layer_s and per_layer else None
        summary.append({"label": label, "kind": kind, "layers": layers, "call_s": call, "per_layer_s": per_layer,
                        "wall_s": m.median_wall_s, "rss": m.peak_rss_bytes, "speedup": speed, "json": js})
        f = lambda x, d=2: "—" if x is None else f"{x:.{d}f}"  # noqa: E731
        table.append(
            f"| {label} | {layers} ({7 * layers}) | {len(m.runs)} | {f(call, 3)} | {f(per_layer, 3)} | {_fmt_s(m)} "
            f"| {_fmt_gb(m)} | {f(added)} | {'—' if speed is None else f'{speed:,.0f}×'} |"
        )
        if not m.ok:
            res_fail = Row(ctx.display(m.cmd), m)
            summary[-1]["failed_row"] = res_fail
    res = SectionResult(title=SECTIONS["adapter"].title, table=table)
    res.rows = [s.pop("failed_row") for s in summary if "failed_row" in s]
    res.runs_text = f"median of {ctx.repeats} runs for ours, 1 run for PEFT (run counts in the table)"
    # errors on layer 0
    err = None
    if m_peft.ok and m_ours1.ok:
        print("[bench] adapter: Frobenius errors on layer 0 (dense float64 SVD)", file=sys.stderr, flush=True)
        r = subprocess.run([ctx.python, str(script), "errors", str(roots[1]), str(peft_out), str(ours_out)],
                           capture_output=True, text=True)
        if r.returncode == 0:
            err = json.loads(r.stdout.strip().splitlines()[-1])
        else:
            res.notes.append(f"**FAILED** computing errors:\n\n```\n{r.stderr[-2000:]}\n```")
    if err:
        etab = ["| Module (layer 0) | ‖ΔW‖_F | dense best rank-16 error | PEFT svd error | ours svd error | ours / best − 1 |",
                "|---|---:|---:|---:|---:|---:|"]
        for row in err["modules"]:
            etab.append(f"| `{row['module']}` | {row['norm']:.6g} | {row['best']:.6g} | {row['peft']:.6g} | {row['ours']:.6g} "
                        f"| {row['ours'] / row['best'] - 1:+.1e} |")
        t = err["total"]
        etab.append(f"| all 7 | {t['norm']:.6g} | {t['best']:.6g} | {t['peft']:.6g} | {t['ours']:.6g} | {t['ours'] / t['best'] - 1:+.1e} |")
        res.table += ["", *etab]
    # Judged per layer on the largest merge at default threads: a model has many layers, and the
    # per-call fixed cost (model card, imports, file writes) dominates a 1-layer merge.
    ours_default = [s for s in summary if s["kind"] == "ours" and "OMP_NUM_THREADS" not in s["label"]]
    big = max(ours_default, key=lambda s: s["layers"], default=None)
    one = next((s for s in ours_default if s["layers"] == 1), None)
    best_speed = big["speedup"] if big else None
    speed_text = "—" if best_speed is None else (
        f"{best_speed:,.0f}× per layer at {big['layers']} layers"
        + (f" ({one['speedup']:,.0f}× at 1 layer, where the per-call fixed cost dominates)" if one and one["speedup"] else "")
    )
    err_ok = err is not None and err["total"]["ours"] <= err["total"]["peft"] * (1 + 1e-6)
    err_text = "—" if err is None else f"ours {err['total']['ours']:.6g} vs PEFT {err['total']['peft']:.6g}"
    res.data["targets"] = [
        {"target": f"adapter svd merge ≥ {ADAPTER_SPEEDUP_TARGET:.0f}× faster than PEFT svd per layer",
         "measured": speed_text,
         "pass": None if best_speed is None else best_speed >= ADAPTER_SPEEDUP_TARGET},
        {"target": "adapter svd error ≤ PEFT's", "measured": err_text, "pass": None if err is None else err_ok},
    ]
    res.table += ["", "| Target (issue tracker) | Measured | Result |", "|---|---:|---|",
                  f"| ours ≥ {ADAPTER_SPEEDUP_TARGET:.0f}× faster than PEFT svd per layer (merge call vs merge call) | "
                  f"{speed_text} | "
                  f"{_pass(None if best_speed is None else best_speed >= ADAPTER_SPEEDUP_TARGET)} |",
                  f"| same or lower Frobenius error than PEFT (layer 0, all 7 modules) | {err_text} | "
                  f"{_pass(None if err is None else err_ok)} |"]
    res.intro = (
        "Four synthetic PEFT LoRA adapters (r = 16, lora_alpha 16/32/32/64, weights 0.4/0.3/0.2/0.1) on Llama-7B "
        "module shapes (hidden 4096, intermediate 11008; q, k, v, o, gate, up, down of every layer), built by "
        "`tests/bench/adapter_bench.py make` (A ~ N(0, 1/in), B ~ 0.01·N(0, 1), seeded per adapter and module, so "
        f"layer 0 is the same in `ADAPTERS_L1` and `ADAPTERS_L{n_big}`). PEFT {_peft_version(ctx)} merges them with "
        "`add_weighted_adapter(combination_type=\"svd\")` on a `PeftModel` whose 1-layer Llama base was built on the "
        "meta device and given uninitialised memory (its weights play no part in the merge); it forms each dense ΔW and "
        "runs a dense SVD per module, so it runs on ONE layer only. Ours computes the same best rank-16 approximation "
        "from QR of the stacked factors and an SVD of the 64×64 core, never forming ΔW. \"Merge call\" is the time of "
        "the merge call itself inside the process (PEFT: `add_weighted_adapter` with the adapters already loaded; ours: "
        "`AdapterMerge.save_pretrained`, which also reads the four adapter files and writes the merged adapter); the "
        "process columns are the whole child process (imports, model build, loading). \"RSS added by the call\" is the "
        "process's peak RSS minus its RSS just before the call."
    )
    res.notes.append(
        "Errors: for each module of layer 0, the dense ΔW = Σ wᵢ·sᵢ·Bᵢ·Aᵢ in float64 and its singular values "
        "(`torch.linalg.svdvals` of ΔW·Q with Q an orthonormal basis of the stacked Aᵢ's row space, so ΔW = ΔW·Q·Qᵀ "
        "exactly; checked against ‖ΔW‖_F; independent of both merges); the dense best rank-16 error is the norm of the singular "
        "values beyond 16 (Eckart–Young), and each merge's error is ‖ΔW − B·A‖_F of its output adapter (scaling "
        "lora_alpha/r applied; both write alpha = r)."
    )
    res.data.update({"summary": [{k: v for k, v in s.items() if k != "json"} | {"json": s["json"]} for s in summary],
                     "errors": err})
    return res


def _peft_version(ctx: Context) -> str:
    r = subprocess.run([ctx.python, "-c", "import peft; print(peft.__version__)"], capture_output=True, text=True)
    return r.stdout.strip() or "?"


# --------------------------------------------------------------------------- search overhead (issue 6)

SEARCH_POINT_TARGET_S = 1.0


@section("search", "Coefficient search: per-point overhead without evaluation (issue 6)")
def section_search(ctx: Context) -> SectionResult:
    """apply + revert in place vs save + reload, per grid point, on the benchmark model."""
    base, fts = ctx.suite()
    script = HERE / "search_bench.py"
    tmp = ctx.output("search", "candidate")
    modes = [("inplace", "in place: `InPlaceDelta.apply(λ)` (search defaults: fp32 deltas cached on CPU)"),
             ("inplace-nocache", "in place with `cache=False` (deltas recomputed from the checkpoints every point)"),
             ("save-reload", "write each candidate and load it: `(BASE + λ·τ).save_pretrained` + `from_pretrained`")]
    per = {}
    for mode, _ in modes:
        cmd = [ctx.python, str(script), mode, str(base), *map(str, fts), "--tmp", str(tmp), "--points", str(ctx.args.search_points)]
        m = ctx.measure(cmd, [base, *fts], "search", repeats=1)
        js = _last_json(m) if m.ok else []
        per[mode] = (cmd, m, js[0] if js else None)
    if not ctx.args.keep_outputs:
        shutil.rmtree(ctx.out_dir / "search", ignore_errors=True)
    table = ["| Per grid point | One-time model load (s) | First point (s) | Median point after the first (s) "
             "| Process peak RSS (GB) | Reverted weights bitwise equal to the checkpoint |",
             "|---|---:|---:|---:|---:|---|"]
    for mode, label in modes:
        cmd, m, js = per[mode]
        if js is None:
            table.append(f"| {label} | **FAILED** | — | — | — | — |")
            continue
        bw = js.get("revert_bitwise_all")
        table.append(f"| {label} | {js['load_s']:.2f} | {js['first_point_s']:.2f} | {js['median_point_s']:.2f} "
                     f"| {_fmt_gb(m)} | {'—' if bw is None else ('yes' if bw else '**NO**')} |")
    ip = per["inplace"][2]
    sr = per["save-reload"][2]
    table += ["", "| Target (issue tracker) | Measured | Result |", "|---|---:|---|",
              f"| per-point overhead ≤ {SEARCH_POINT_TARGET_S:g} s (in place, search defaults) | "
              f"{'—' if ip is None else format(ip['median_point_s'], '.2f') + ' s'} | "
              f"{_pass(None if ip is None else ip['median_point_s'] <= SEARCH_POINT_TARGET_S)} |"]
    if ip and sr:
        table.append(f"| in place vs save + reload | {sr['median_point_s'] / ip['median_point_s']:.1f}× faster | n/a |")
    res = SectionResult(title=SECTIONS["search"].title, table=table, legend=ctx.model_legend())
    res.runs_text = f"{ctx.args.search_points} grid points (λ = 0.2, 0.4, …) in one process per mode"
    res.intro = (
        f"`tests/bench/search_bench.py MODE BASE FT1 FT2 FT3 --points {ctx.args.search_points}`: τ = 0.5·τ₁ + 0.3·τ₂ + 0.2·τ₃ "
        "of the benchmark model, and what `hf-taskarith search` does between two evaluations. The base is loaded once "
        "(`AutoModelForCausalLM`, bf16); evaluation is not included. The first in-place point also computes the deltas "
        "(and, by default, caches them: 4 bytes per parameter), which the search does once per run. In place, a "
        "point is one `apply(λ)` from the originals (the search moves from point to point without reverting); the "
        "one bitwise revert at the end took "
        + ", ".join(f"{per[m][2]['final_revert_s']:.2f} s ({m})" for m, _ in modes if per[m][2] and "final_revert_s" in per[m][2])
        + "."
    )
    res.rows = [Row(ctx.display(c), m) for c, m, js in per.values() if not m.ok]
    res.data["search"] = {k: v[2] for k, v in per.items()}
    res.data["targets"] = [{
        "target": f"search: per-point overhead ≤ {SEARCH_POINT_TARGET_S:g} s (in place)",
        "measured": "—" if ip is None else f"{ip['median_point_s']:.2f} s",
        "pass": None if ip is None else ip["median_point_s"] <= SEARCH_POINT_TARGET_S}]
    return res


# --------------------------------------------------------------------------- GPU


@section("gpu", "GPU (`--device cuda`)")
def section_gpu(ctx: Context) -> SectionResult:
    """apply and ties with --device cuda, when there is a GPU; otherwise says so."""
    import torch

    res = SectionResult(title=SECTIONS["gpu"].title)
    if not torch.cuda.is_available():
        res.runs_text = "nothing run"
        res.intro = (
            "**Not run: no CUDA device on this machine** (`torch.cuda.is_available()` is False; torch "
            f"{ctx.machine['torch']}). On a machine with a GPU, `.venv/bin/python tests/bench/run_bench.py --only gpu` "
            "times `hf-taskarith apply` and the `ties` merge with `--device cuda` on the same inputs."
        )
        res.data["skipped"] = "no CUDA"
        return res
    base, fts = ctx.suite()
    floor = ctx.floor()
    name = torch.cuda.get_device_name(0)
    cmd = [str(ctx.bin / "hf-taskarith"), "apply", "--base", str(base)]
    for ft, w in zip(fts, METHOD_WEIGHTS):
        cmd += ["--task", f"{ft}:{w}"]
    cmd += ["--out", str(ctx.output("gpu", "apply")), "--dtype", "bfloat16", "--overwrite", "--device", "cuda"]
    res.rows.append(Row(ctx.display(cmd), ctx.measure(cmd, [base, *fts], "gpu"), floor, note="apply, cuda"))
    for method in ("task_arithmetic", "ties", "dare_ties"):
        c = _method_cmd(ctx, method, base, fts, ctx.output("gpu", method), "gpu") + ["--device", "cuda"]
        res.rows.append(Row(ctx.display(c), ctx.measure(c, [base, *fts], "gpu"), floor, note=f"{method}, cuda"))
    if not ctx.args.keep_outputs:
        shutil.rmtree(ctx.out_dir / "gpu", ignore_errors=True)
    res.intro = f"Device: {name}. Same inputs and commands as the CPU sections, with `--device cuda`."
    res.legend = ctx.model_legend()
    return res


# --------------------------------------------------------------------------- main


def header(ctx: Context) -> str:
    names = ",".join(SECTIONS)
    m = ctx.machine
    return "\n".join(
        [
            "# Benchmarks",
            "",
            f"_Written by `tests/bench/run_bench.py`; last updated {ctx.started}._",
            "",
            f"- Rerun everything: `make bench` (= `.venv/bin/python tests/bench/run_bench.py --out {ctx.args.out}`).",
            f"- Rerun some sections: `.venv/bin/python tests/bench/run_bench.py --out {ctx.args.out} --only {names}` "
            "(sections not selected keep their previous results).",
            f"- Last run on: {m['summary']}, Linux {m['kernel']}, Python {m['python']}, torch {m['torch']}, git {m['git']}.",
            "- Each section states its own date and machine. Wall time: median of the runs; peak RSS: "
            "max over the runs of the child's `ru_maxrss` (GB = 10⁹ bytes); wall / floor: median wall time "
            "divided by the IO floor's on the same inputs.",
        ]
    )


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="hf_taskarith benchmarks → markdown")
    p.add_argument("--out", default="BENCHMARKS.md", help="markdown file to write/merge (default BENCHMARKS.md)")
    p.add_argument("--only", default=None, help=f"comma-separated sections (default all: {','.join(SECTIONS)})")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per command (default 3)")
    p.add_argument("--work", default=str(REPO / "bench_work"), help="working folder for inputs/outputs (default bench_work)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run before it is killed (default 3600)")
    p.add_argument(
        "--layers", type=int, default=synth.BASE_CONFIG["num_hidden_layers"],
        help="decoder layers of the synthetic models (default 16, the ~0.95B 1x model; smaller for a smoke test)",
    )
    p.add_argument(
        "--repeats-slow", type=int, default=1,
        help="runs in all for a command whose first run exceeds --slow-s (default 1; methods section)",
    )
    p.add_argument("--slow-s", type=float, default=60.0, help="see --repeats-slow (default 60 s)")
    p.add_argument("--adapter-layers", type=int, default=4, help="layers for our adapter merges (PEFT runs on 1; default 4)")
    p.add_argument("--adapter-peft-thin", action="store_true",
                   help="adapter section: also time PEFT svd with svd_full_matrices=False (several more minutes)")
    p.add_argument("--scaling-jobs", default="apply,task_arithmetic,ties,dare_ties",
                   help="scaling section: commands run at 1x and 2x depth (default all four: "
                   "apply,task_arithmetic,ties,dare_ties)")
    p.add_argument("--search-points", type=int, default=5, help="grid points per mode in the search section (default 5)")
    p.add_argument("--keep-outputs", action="store_true", help="do not delete output folders after a section")
    p.add_argument("--strict", action="store_true", help="exit 1 when a command or a verification failed")
    p.add_argument("--list", action="store_true", help="list the sections and exit")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.list:
        for s in SECTIONS.values():
            print(f"{s.name:10s} {s.title}")
        return 0
    names = list(SECTIONS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(f"unknown section(s): {', '.join(unknown)}; known: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    names = [n for n in SECTIONS if n in names and n != "summary"]  # registry order
    names.append("summary")  # always refreshed, last: it reads the other sections' results

    ctx = Context(args)
    free = shutil.disk_usage(ctx.work.parent if not ctx.work.exists() else ctx.work).free
    if free < 15 * GB:
        print(f"[bench] warning: only {free / GB:.1f} GB free for {ctx.work}", file=sys.stderr)

    out_path = Path(args.out)
    rendered: Dict[str, str] = {}
    failed = []
    for name in names:
        print(f"[bench] == section {name} ==", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        load0 = os.getloadavg()[0]
        try:
            res = SECTIONS[name].fn(ctx)
        except Exception as err:  # a broken section must not lose the others' results
            import traceback

            tb = traceback.format_exc()
            print(tb, file=sys.stderr)
            res = SectionResult(title=SECTIONS[name].title, notes=[f"**FAILED**: the section raised `{type(err).__name__}: {err}`", "```\n" + tb[-3000:] + "```"])
            res.data["verify_failed"] = True
        res.data.setdefault("loadavg", [load0, os.getloadavg()[0]])
        if res.failed:
            failed.append(name)
        rendered[name] = render_section(name, res, ctx)
        ctx.record("sections", name, {
            "date": ctx.started,
            "machine": ctx.machine,
            "rows": [{"command": r.command, **r.m.to_dict(), "floor_wall_s": r.floor_wall_s} for r in res.rows],
            **res.data,
        })
        # Write after every section so that a long run keeps what it measured.
        old = out_path.read_text() if out_path.exists() else ""
        out_path.write_text(merge_document(old, {name: rendered[name]}, header(ctx)))
        print(f"[bench] section {name} done in {time.perf_counter() - t0:.0f}s → {out_path}", file=sys.stderr, flush=True)

    if failed:
        print(f"[bench] FAILED in section(s): {', '.join(failed)} (see {out_path})", file=sys.stderr)
        return 1 if args.strict else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
