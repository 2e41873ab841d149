"""Helpers of the ``taskarith_*`` lm-eval tasks (loaded by lm-eval through ``!function utils.…``).

``load_local`` is each task's ``custom_dataset``: it reads the ``data_files`` of the task's
``dataset_kwargs`` as JSON lines, resolving relative paths against THIS folder, so the tasks work
from any working directory (``datasets.load_dataset("json", data_files=...)`` would resolve them
against the current directory). It builds in-memory datasets: no Arrow cache is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

HERE = Path(__file__).resolve().parent


def _read_jsonl(path: Path) -> List[Dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_local(data_files: Dict[str, str], **_ignored: Any):
    """``{split: path}`` (relative to this folder, or absolute) → ``datasets.DatasetDict``."""
    import datasets

    splits = {}
    for split, rel in data_files.items():
        path = Path(rel)
        path = path if path.is_absolute() else HERE / path
        if not path.is_file():
            raise FileNotFoundError(f"taskarith task data {path} is missing (run recipes/tasks/make_data.py)")
        splits[split] = datasets.Dataset.from_list(_read_jsonl(path))
    return datasets.DatasetDict(splits)


def prefix_exact_match(doc: Dict[str, Any], results: List[str]) -> Dict[str, float]:
    """1.0 when the generation's first ``len(answer)`` words are the answer's words, else 0.0.

    A model that keeps generating after the answer is not penalised for what comes after it
    (the tiny vocabulary has no end-of-answer word).
    """
    want = doc["answer"].split()
    got = (results[0] if results else "").split()
    return {"exact_match": float(got[: len(want)] == want)}
