"""Wall time and peak RSS of a command run in a child process.

Each run goes through a fresh wrapper interpreter that forks and execs the command and reports
``os.wait4``'s resource usage of exactly that child (and of the descendants it waited for), so
measurements neither accumulate across runs nor inherit the harness's own RSS high-water mark (see
``run_once``). ``ru_maxrss`` counts resident pages of the process, file-backed ones included
(pages of mmapped inputs that were touched count while they stay mapped).

Usage from Python::

    m = measure(["python", "script.py", ...], repeats=3, warm_paths=[input_dir], before_each=cleanup)
    m.ok, m.median_wall_s, m.peak_rss_bytes, m.stderr_tail
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

_CHUNK = 16 << 20


@dataclass
class Run:
    """One execution of the command."""

    returncode: int
    wall_s: float
    maxrss_bytes: int
    stdout_tail: str = ""
    stderr_tail: str = ""


@dataclass
class Measurement:
    """Aggregate of ``repeats`` runs: median wall time, max of the per-run peak RSS.

    ``ok`` is False when the command could not start, failed (non-zero exit) or timed out; the runs
    stop at the first failure and ``error`` / ``stderr_tail`` say why.
    """

    cmd: List[str]
    runs: List[Run] = field(default_factory=list)
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.runs) and all(r.returncode == 0 for r in self.runs)

    @property
    def median_wall_s(self) -> Optional[float]:
        return statistics.median(r.wall_s for r in self.runs) if self.ok else None

    @property
    def peak_rss_bytes(self) -> Optional[int]:
        return max(r.maxrss_bytes for r in self.runs) if self.ok else None

    @property
    def stderr_tail(self) -> str:
        return self.runs[-1].stderr_tail if self.runs else ""

    def to_dict(self) -> dict:
        return {
            "cmd": self.cmd,
            "ok": self.ok,
            "error": self.error,
            "median_wall_s": self.median_wall_s,
            "peak_rss_bytes": self.peak_rss_bytes,
            "walls_s": [r.wall_s for r in self.runs],
            "maxrss_bytes": [r.maxrss_bytes for r in self.runs],
            "stderr_tail": self.stderr_tail if not self.ok else "",
        }


def _tail(path: Path, max_lines: int = 20, max_chars: int = 4000) -> str:
    """Last lines of a log file (progress-bar carriage returns folded to their last state)."""
    try:
        data = path.read_bytes()[-200_000:].decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [ln.rsplit("\r", 1)[-1] for ln in data.splitlines()]
    lines = [ln for ln in lines if ln.strip()]
    return "\n".join(lines[-max_lines:])[-max_chars:]


def warm_page_cache(paths: Iterable[os.PathLike]) -> int:
    """Read every file under ``paths`` once (untimed) so that runs start with a warm page cache.

    Returns the number of bytes read.
    """
    total = 0
    for p in paths:
        p = Path(p)
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while True:
                    n = len(fh.read(_CHUNK))
                    if not n:
                        break
                    total += n
    return total


#: Runs in a fresh, small interpreter: fork + exec the command, wait4 it, print JSON.
_WRAPPER = r"""
import json, os, sys, time
cmd, out, err = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 1)
        os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
        os.execvp(cmd[0], cmd)
    except BaseException as e:
        os.write(2, ("could not start %r: %s\n" % (cmd[0], e)).encode())
    os._exit(127)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "wall_s": wall, "maxrss": ru.ru_maxrss}))
"""


def run_once(cmd: Sequence[str], env: Optional[Dict[str, str]] = None, timeout_s: Optional[float] = None) -> Run:
    """Run ``cmd`` once; wall time and peak RSS of that child only.

    The command is started from a fresh wrapper interpreter (``python -I -S -c``, ~10 MB), not
    from this process: on Linux a child's ``ru_maxrss`` starts at the RSS high-water mark of the
    process it was forked from (``exec`` keeps the larger of the two), so forking from a big
    harness would report the harness's own peak. The wrapper forks, execs, ``wait4``s the child
    and prints the child's wall time and ``ru_maxrss``.

    Raises ``FileNotFoundError`` when the executable does not exist. A timeout kills the wrapper's
    process group and gives return code -9.
    """
    cmd = [str(c) for c in cmd]
    if shutil.which(cmd[0], path=(env or os.environ).get("PATH")) is None:
        raise FileNotFoundError(f"no such executable: {cmd[0]}")
    with tempfile.TemporaryDirectory(prefix="bench-") as td:
        out_p, err_p = Path(td) / "stdout", Path(td) / "stderr"
        wrapper = [sys.executable, "-I", "-S", "-c", _WRAPPER, json.dumps(cmd), str(out_p), str(err_p)]
        proc = subprocess.Popen(wrapper, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
        try:
            report, wrapper_err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the wrapper and the command it started
            proc.communicate()
            return Run(-9, float(timeout_s), 0, _tail(out_p), _tail(err_p))
        try:
            r = json.loads(report.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise RuntimeError(f"measurement wrapper failed: {wrapper_err.decode(errors='replace')[-2000:]}")
        # ru_maxrss is in KiB on Linux (bytes on macOS).
        maxrss = r["maxrss"] * (1 if sys.platform == "darwin" else 1024)
        return Run(r["rc"], r["wall_s"], maxrss, _tail(out_p), _tail(err_p))


def measure(
    cmd: Sequence[str],
    repeats: int = 3,
    warm_paths: Iterable[os.PathLike] = (),
    before_each: Optional[Callable[[], None]] = None,
    env: Optional[Dict[str, str]] = None,
    timeout_s: Optional[float] = None,
) -> Measurement:
    """Run ``cmd`` ``repeats`` times after one untimed read of ``warm_paths``.

    ``before_each`` runs (untimed) before every run, e.g. to delete the previous output and
    ``os.sync()`` so that the write-back of one run does not land in the next.
    """
    m = Measurement(cmd=[str(c) for c in cmd])
    warm_page_cache(warm_paths)
    for _ in range(repeats):
        if before_each is not None:
            before_each()
        try:
            run = run_once(m.cmd, env=env, timeout_s=timeout_s)
        except OSError as err:
            m.error = f"could not start: {type(err).__name__}: {err}"
            break
        m.runs.append(run)
        if run.returncode != 0:
            m.error = "timed out" if run.returncode == -9 and timeout_s else f"exit code {run.returncode}"
            break
    return m


if __name__ == "__main__":
    # python tests/bench/measure.py [--repeats N] -- CMD ...
    import argparse

    ap = argparse.ArgumentParser(description="median wall time and peak RSS of a command")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    print(json.dumps(measure(cmd, a.repeats).to_dict(), indent=2))
