"""Test session set-up: offline, a private HF_HOME, and the tiny model zoo."""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Before huggingface_hub / transformers are imported by any test module: a private cache, no network.
_HF_HOME = tempfile.mkdtemp(prefix="hf_taskarith-hf-home-")
os.environ["HF_HOME"] = _HF_HOME
os.environ.pop("HF_HUB_CACHE", None)
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("HF_TOKEN", None)


def pytest_configure(config):
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """name -> folder of the tiny models (see tests/zoo.py). HF_TASKARITH_ZOO_CACHE reuses a folder."""
    import torch

    from zoo import build_zoo

    torch.set_num_threads(2)
    cache = os.environ.get("HF_TASKARITH_ZOO_CACHE")
    root = Path(cache) if cache else tmp_path_factory.mktemp("zoo")
    return build_zoo(root)
