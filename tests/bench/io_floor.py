"""The IO floor of a merge: read every tensor of the inputs, write one model.

    python tests/bench/io_floor.py BASE FT1 [FT2 ...] OUT

Reads every tensor of every finetune with safetensors (``safe_open`` per shard, ``get_tensor``
each tensor, discard), then reads the base shard by shard and writes its tensors to ``OUT`` with
``save_file`` (same shard names, index and config files copied). No arithmetic: this is the least
a merge of these inputs into one output can cost with plain safetensors IO, and the benchmark
reports the merge tools' wall time relative to it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Dict, List

from safetensors import safe_open
from safetensors.torch import save_file

_COPY = ("config.json", "generation_config.json", "model.safetensors.index.json")


def shard_files(folder: Path) -> List[Path]:
    """The safetensors shards of a checkpoint folder, in index order when there is an index."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
        return [folder / n for n in sorted(names)]
    return sorted(folder.glob("*.safetensors"))


def read_all(folder: Path) -> int:
    """Read (and drop) every tensor of a checkpoint; returns the bytes read."""
    total = 0
    for shard in shard_files(folder):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                total += t.numel() * t.element_size()
                del t
    return total


def copy_model(src: Path, out: Path) -> int:
    """Read ``src`` shard by shard and write each shard to ``out`` with ``save_file``."""
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for shard in shard_files(src):
        tensors: Dict[str, "torch.Tensor"] = {}  # noqa: F821
        with safe_open(str(shard), framework="pt") as f:
            meta = f.metadata()
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
                total += tensors[name].numel() * tensors[name].element_size()
        save_file(tensors, str(out / shard.name), metadata=meta)
        del tensors
    for name in _COPY:
        if (src / name).exists():
            shutil.copyfile(src / name, out / name)
    return total


def main(argv: List[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    base, *fts, out = (Path(a) for a in argv)
    read = sum(read_all(ft) for ft in fts)
    written = copy_model(base, out)
    print(json.dumps({"read_bytes": read + written, "written_bytes": written}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
