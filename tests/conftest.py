"""Test session set-up: a private HF_HOME, quiet tokenizers, seeded torch, and the tiny model zoo."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import zoo`, `import hub_server`

_HF_HOME: str | None = None


def pytest_configure(config):
    """Runs before any test module is imported, so huggingface_hub reads these at its import time."""
    global _HF_HOME
    _HF_HOME = tempfile.mkdtemp(prefix="hf_taskarith-hf-home-")
    os.environ["HF_HOME"] = _HF_HOME
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        os.environ.pop(var, None)  # nothing from the developer's own cache or account leaks in
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    warnings.filterwarnings("ignore", category=FutureWarning)


def pytest_unconfigure(config):
    if _HF_HOME:
        shutil.rmtree(_HF_HOME, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    """Two threads at most: the tests' tensors are tiny and the CI boxes have two cores."""
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state, whatever ran before it."""
    import random

    import torch

    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one thread is ~10x faster than two under contention."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def hf_home() -> Path:
    """The session's private HF_HOME (a temp dir, removed at the end)."""
    return Path(os.environ["HF_HOME"])


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """name -> folder of the tiny models (see tests/zoo.py). HF_TASKARITH_ZOO_CACHE reuses a folder across runs."""
    from zoo import build_zoo

    cache = os.environ.get("HF_TASKARITH_ZOO_CACHE")
    root = Path(cache) if cache else tmp_path_factory.mktemp("zoo")
    return build_zoo(root)
