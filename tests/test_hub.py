"""Hub round trip with the real huggingface_hub client against a local Hub-protocol server."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hf_taskarith import TaskVector
from hf_taskarith.cli import main
from hub_server import HubServer, hub_server  # noqa: F401  (fixture)


@pytest.fixture(autouse=True)
def no_retry_wait(monkeypatch):
    import hf_taskarith.hub as hub

    monkeypatch.setattr(hub, "RETRY_DELAYS", (0.0, 0.0, 0.0))


def _all_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def test_push_merged_model_card_and_reload(zoo, hub_server, tmp_path, caplog):
    from huggingface_hub import ModelCard, snapshot_download
    from transformers import AutoModelForCausalLM

    caplog.set_level(logging.DEBUG)
    merged = (0.5 * TaskVector.from_models(zoo["llama_base"], zoo["llama_ft_a"])
              - 0.3 * TaskVector.from_models(zoo["llama_base"], zoo["llama_ft_b"])).apply_to(zoo["llama_base"])
    out = merged.save_pretrained(tmp_path / "merged", dtype="float32", progress=False)
    url = merged.push_to_hub("alice/merged", private=True, commit_message="first merge")
    assert "alice/merged" in url

    local = snapshot_download("alice/merged")
    model = AutoModelForCausalLM.from_pretrained("alice/merged")
    ours = load_file(out / "model.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(v, ours[k]), k
    card = ModelCard.load(Path(local) / "README.md")
    data = card.data.to_dict()
    assert data["base_model_relation"] == "merge" and data["library_name"] == "transformers"
    assert {"merge", "task-arithmetic", "hf-taskarith"} <= set(data["tags"])
    assert "(negation)" in card.text  # weight −0.3 shown as negation
    assert str(zoo["llama_base"]) not in card.content  # local inputs by folder name only
    assert "llama_ft_b" in card.content and "```yaml" in card.content
    # Exactly one commit after the repo's initial one, whatever the number of files.
    assert len(hub_server.commits("alice/merged")) == 2
    # The token never appears in files or logs.
    assert hub_server.token.encode() not in _all_bytes(Path(local))
    assert hub_server.token not in caplog.text


def test_push_adapter_via_cli_and_load_with_peft(zoo, hub_server, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    code = main(["-q", "push", str(zoo["lora_plain"]), "bob/lora", "--private", "--commit-message", "adapter"])
    assert code == 0, capsys.readouterr().err
    base = AutoModelForCausalLM.from_pretrained(zoo["llama_base"])
    model = PeftModel.from_pretrained(base, "bob/lora")
    ref = load_file(zoo["lora_plain"] / "adapter_model.safetensors")
    state = {k.replace(".default", ""): v for k, v in model.state_dict().items()}
    for k, v in ref.items():
        assert torch.equal(state[k], v), k


def test_repush_of_unchanged_files_uploads_nothing(zoo, hub_server, tmp_path):
    merged = TaskVector.from_models(zoo["llama_base"], zoo["llama_ft_a"]).apply_to(zoo["llama_base"])
    out = merged.save_pretrained(tmp_path / "m", progress=False)
    merged.push_to_hub("alice/again")
    sent = hub_server.uploaded_bytes_total
    merged.push_to_hub("alice/again")
    assert hub_server.uploaded_bytes_total == sent
    assert len(hub_server.commits("alice/again")) == 2
    assert out.is_dir()


def test_commit_failure_leaves_remote_unchanged_and_cli_fails(zoo, hub_server, tmp_path, capsys):
    folder = zoo["lora_plain"]
    assert main(["-q", "push", str(folder), "carol/x"]) == 0
    before = hub_server.files("carol/x")
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_config.json").write_text("{}")
    hub_server.fail_next_commit = 10  # every retry fails
    code = main(["-q", "push", str(other), "carol/x"])
    err = capsys.readouterr().err
    assert code != 0 and "HTTP 500" in err and "not changed" in err
    assert hub_server.files("carol/x") == before
    assert hub_server.token not in err


def test_transient_500_is_retried(zoo, hub_server):
    hub_server.fail_next_commit = 1
    assert main(["-q", "push", str(zoo["lora_plain"]), "dave/retry"]) == 0
    assert "adapter_model.safetensors" in hub_server.files("dave/retry")


def test_auth_errors_are_clear(zoo, hub_server, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_xyz")
    code = main(["-q", "push", str(zoo["lora_plain"]), "erin/x"])
    err = capsys.readouterr().err
    assert code != 0 and ("401" in err or "authentication" in err.lower())
    assert "hf_wrong_token_xyz" not in err


def test_recipe_push_to_hub(zoo, hub_server, tmp_path):
    from hf_taskarith.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "base": str(zoo["llama_base"]), "method": "ties", "parameters": {"density": 0.5},
        "tasks": [{"model": str(zoo["llama_ft_a"]), "weight": 0.6}, {"adapter": str(zoo["lora_plain"]), "weight": 0.4}],
        "output": {"push_to_hub": {"repo_id": "frank/ties", "private": True}},
    }))
    assert main(["-q", "merge", str(recipe), "--out", str(tmp_path / "out")]) == 0
    files = hub_server.files("frank/ties")
    assert "model.safetensors" in files and "README.md" in files
    card = files["README.md"].decode()
    assert "ties" in card and "arxiv.org" in card.lower() and str(tmp_path) not in card


def test_pull_private_repo_with_token_pins_sha_and_downloads_minimal_files(zoo, hub_server, monkeypatch):
    from hf_taskarith import ModelReferenceError, resolve

    files = {p.name: p.read_bytes() for p in zoo["llama_ft_a"].iterdir() if p.is_file()}
    files["training_args.bin"] = b"not needed by a merge"
    files["optimizer.pt"] = b"not needed either"
    sha = hub_server.add_repo("gina/private-ft", files, private=True)
    resolved = resolve("gina/private-ft")  # HF_TOKEN is set by the fixture
    assert resolved.commit_sha == sha
    assert {p.name for p in resolved.path.iterdir()} == set(files) - {"training_args.bin", "optimizer.pt"}
    assert resolve(f"gina/private-ft@{sha}").commit_sha == sha
    tv = TaskVector.from_models(zoo["llama_base"], "gina/private-ft")
    assert tv.source.commit_sha == sha
    monkeypatch.delenv("HF_TOKEN")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(Path(c.HF_HUB_CACHE).parent / "empty-cache"))
    with pytest.raises(ModelReferenceError, match="private") as err:
        resolve("gina/private-ft", cache_dir=Path(c.HF_HUB_CACHE))
    assert hub_server.token not in str(err.value)
