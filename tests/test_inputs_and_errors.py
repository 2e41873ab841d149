"""References, the lazy reader and bad input: clear errors, non-zero exits, no output left behind."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_taskarith import CheckpointError, TaskVector, open_checkpoint, resolve
from hf_taskarith.cli import main
from zoo import populate_hf_cache


def run_cli(args, capsys):
    code = main(["-q", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.err.strip()


def assert_clean_failure(code, err, out: Path, *needles):
    assert code != 0
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    for needle in needles:
        assert needle.lower() in err.lower(), err
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*")), "temp folder left behind"


# ---------------------------------------------------------------- references
def test_hub_id_resolves_offline_from_cache_and_records_sha(zoo, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    hub_cache = Path(c.HF_HUB_CACHE)
    sha = populate_hf_cache(hub_cache.parent, "tiny-org/llama-ft-a", zoo["llama_ft_a"])
    resolved = resolve("tiny-org/llama-ft-a")
    assert resolved.commit_sha == sha and resolved.repo_id == "tiny-org/llama-ft-a"
    assert resolve(f"tiny-org/llama-ft-a@{sha}").commit_sha == sha
    # A merge through Hub ids gives the same bytes as through local folders.
    populate_hf_cache(hub_cache.parent, "tiny-org/llama-base", zoo["llama_base"])
    via_hub = TaskVector.from_models("tiny-org/llama-base", "tiny-org/llama-ft-a").apply_to("tiny-org/llama-base")
    assert via_hub.inputs()[0].commit_sha == sha
    for k, v in via_hub.state_dict(torch.float32).items():
        assert torch.equal(v, load_file(zoo["llama_ft_a"] / "model.safetensors")[k])
    with pytest.raises(Exception, match="tiny-org/missing"):
        resolve("tiny-org/missing")


def test_reading_a_shape_reads_no_data(zoo, monkeypatch):
    ckpt = open_checkpoint(zoo["llama_base"])
    calls = []
    monkeypatch.setattr(os, "preadv", lambda *a: calls.append(a) or 0)
    assert ckpt.shape("model.embed_tokens.weight")[1] > 0
    assert ckpt.dtype("model.norm.weight") == torch.float32
    assert calls == []


def test_reader_matches_safetensors(zoo):
    ckpt = open_checkpoint(zoo["gpt2_base"])
    ref = load_file(zoo["gpt2_base"] / "model.safetensors")
    assert set(ckpt.keys()) == set(ref)
    for k, v in ref.items():
        assert torch.equal(ckpt.get(k), v)


def test_safe_bin_checkpoint_loads_with_warning(zoo, tmp_path, caplog):
    folder = tmp_path / "binft"
    folder.mkdir()
    shutil.copy(zoo["llama_ft_a"] / "config.json", folder)
    torch.save(load_file(zoo["llama_ft_a"] / "model.safetensors"), folder / "pytorch_model.bin")
    with caplog.at_level("WARNING"):
        got = TaskVector.from_models(zoo["llama_base"], folder).apply_to(zoo["llama_base"]).state_dict(torch.float32)
    assert "weights_only" in caplog.text
    for k, v in load_file(zoo["llama_ft_a"] / "model.safetensors").items():
        assert torch.equal(got[k], v)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(zoo, tmp_path, capsys):
    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(zoo["llama_ft_a"] / "config.json", folder)
    marker = tmp_path / "pwned"
    torch.save({"model.norm.weight": _Evil(marker)}, folder / "pytorch_model.bin")
    out = tmp_path / "out"
    code, err = run_cli(["apply", "--base", zoo["llama_base"], "--task", folder, "--out", out], capsys)
    assert_clean_failure(code, err, out, "pytorch_model.bin", "weights_only")
    assert not marker.exists(), "the pickle payload ran"


# ---------------------------------------------------------------- bad inputs through the CLI
def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_shape_mismatch(zoo, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(["apply", "--base", zoo["llama_base"], "--task", zoo["llama_other_arch"], "--out", out], capsys)
    assert_clean_failure(code, err, out, "shape mismatch", "llama_other_arch")


def test_tensor_missing_from_finetune(zoo, tmp_path, capsys):
    ft = _copy_model(zoo["llama_ft_a"], tmp_path / "ft_missing")
    sd = load_file(ft / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, ft / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    code, err = run_cli(["apply", "--base", zoo["llama_base"], "--task", ft, "--out", out], capsys)
    assert_clean_failure(code, err, out, "model.layers.1.mlp.up_proj.weight", "missing")


def test_different_architecture(zoo, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(["apply", "--base", zoo["llama_base"], "--task", zoo["gpt2_ft_a"], "--out", out], capsys)
    assert_clean_failure(code, err, out, "model_type", "gpt2")


def test_adapter_trained_on_another_base(zoo, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(["apply", "--base", zoo["llama_other_arch"], "--adapter", zoo["lora_plain"], "--out", out], capsys)
    assert_clean_failure(code, err, out, "lora_plain", "another base")


def test_resized_vocabulary_says_what_to_do(zoo, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(["apply", "--base", zoo["llama_base"], "--task", zoo["llama_resized"], "--out", out], capsys)
    assert_clean_failure(code, err, out, "vocabulary was resized", "resize_token_embeddings")


def test_corrupted_header(zoo, tmp_path, capsys):
    ft = _copy_model(zoo["llama_ft_a"], tmp_path / "ft_corrupt")
    data = bytearray((ft / "model.safetensors").read_bytes())
    data[8:40] = b"\x00garbage-not-json{{{{{{{{{{{{{{{{"
    (ft / "model.safetensors").write_bytes(bytes(data))
    out = tmp_path / "out"
    code, err = run_cli(["apply", "--base", zoo["llama_base"], "--task", ft, "--out", out], capsys)
    assert_clean_failure(code, err, out, "ft_corrupt", "corrupt")


def test_truncated_file(zoo, tmp_path, capsys):
    ft = _copy_model(zoo["llama_ft_a"], tmp_path / "ft_trunc")
    path = ft / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size - 1000])
    out = tmp_path / "out"
    code, err = run_cli(["apply", "--base", zoo["llama_base"], "--task", ft, "--out", out], capsys)
    assert_clean_failure(code, err, out, "ft_trunc", "truncated")


def test_existing_output_is_refused_then_overwritten(zoo, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = run_cli(["apply", "--base", zoo["llama_base"], "--task", zoo["llama_ft_a"], "--out", out], capsys)
    assert code != 0 and "not empty" in err and (out / "keep.txt").read_text() == "precious"
    code, _ = run_cli(["apply", "--base", zoo["llama_base"], "--task", zoo["llama_ft_a"], "--out", out, "--overwrite"], capsys)
    assert code == 0 and not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_output_may_not_be_an_input(zoo, tmp_path, capsys):
    base = _copy_model(zoo["llama_base"], tmp_path / "base")
    code, err = run_cli(["apply", "--base", base, "--task", zoo["llama_ft_a"], "--out", base, "--overwrite"], capsys)
    assert code != 0 and "one of the inputs" in err
    assert (base / "model.safetensors").is_file()


def test_non_lora_adapter_is_refused(zoo, tmp_path, capsys):
    ad = _copy_model(zoo["lora_plain"], tmp_path / "ia3")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    code, err = run_cli(["apply", "--base", zoo["llama_base"], "--adapter", ad, "--out", out], capsys)
    assert_clean_failure(code, err, out, "peft_type", "IA3")


def test_failure_while_streaming_leaves_no_output(zoo, tmp_path, monkeypatch):
    from hf_taskarith.merged import MergedModel

    calls = {"n": 0}
    original = MergedModel.compute

    def flaky(self, name, base_tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk on fire")
        return original(self, name, base_tensor)

    monkeypatch.setattr(MergedModel, "compute", flaky)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        TaskVector.from_models(zoo["llama_base"], zoo["llama_ft_a"]).apply_to(zoo["llama_base"]).save_pretrained(out, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_console_script_end_to_end(zoo, tmp_path):
    exe = Path(sys.executable).with_name("hf-taskarith")
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(exe), "-q", "apply", "--base", str(zoo["llama_base"]), "--task", f"{zoo['llama_ft_a']}:0.5",
         "--adapter", f"{zoo['lora_plain']}:-1", "--dtype", "bf16", "--out", str(out)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert load_file(out / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16
    proc = subprocess.run([str(exe), "apply", "--base", str(tmp_path / "nope"), "--task", "x", "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
