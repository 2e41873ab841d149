"""The in-memory Hub server (tests/hub_server.py) against the real huggingface_hub / transformers / peft clients."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hub_server import HubServer, git_blob_sha1, hub_server  # noqa: F401  (fixture)
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from safetensors.torch import save_file

README = "---\nlicense: apache-2.0\ntags:\n- merge\n---\n# Merged model\n"


def make_folder(root: Path, value: float = 1.0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))
    save_file({"w": torch.full((4, 4), value), "b": torch.arange(4.0)}, str(root / "model.safetensors"))
    (root / "README.md").write_text(README)
    return root


def folder_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def commit_posts(server: HubServer) -> list[str]:
    return [p for p in server.request_paths("POST") if "/commit/" in p]


def test_create_private_repo_and_upload_folder_in_one_commit(hub_server, tmp_path):
    api = HfApi()
    url = api.create_repo("ns/merged", private=True)
    assert url == f"{hub_server.url}/ns/merged" and url.repo_id == "ns/merged"
    assert hub_server.repos["ns/merged"]["private"] is True
    # exist_ok=True: the client reads `url` from the 409 body
    assert api.create_repo("ns/merged", exist_ok=True).repo_id == "ns/merged"
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_repo("ns/merged")
    assert exc.value.response.status_code == 409

    folder = make_folder(tmp_path / "out")
    info = api.upload_folder(repo_id="ns/merged", folder_path=folder, commit_message="Merge")
    assert len(commit_posts(hub_server)) == 1  # all three files in ONE commit
    assert info.oid == hub_server.head("ns/merged") and len(info.oid) == 40
    files = hub_server.files("ns/merged")
    assert {k: v for k, v in files.items() if k != ".gitattributes"} == folder_bytes(folder)
    assert [c["summary"] for c in hub_server.commits("ns/merged")] == ["Merge", "initial commit"]

    mi = api.model_info("ns/merged")
    assert mi.private is True and mi.sha == info.oid
    assert {s.rfilename for s in mi.siblings} == set(files)
    assert mi.card_data["license"] == "apache-2.0"
    assert sorted(api.list_repo_files("ns/merged")) == sorted(files)
    tree = {e.path: e for e in api.list_repo_tree("ns/merged", recursive=True)}
    assert tree["model.safetensors"].blob_id == git_blob_sha1(files["model.safetensors"])
    # the bearer token never lands in the request log
    assert all(r.headers.get("Authorization") in (None, "<redacted>") for r in hub_server.requests)


def test_snapshot_download_and_download_by_commit(hub_server, tmp_path):
    api = HfApi()
    api.create_repo("ns/m", private=True)
    folder = make_folder(tmp_path / "out")
    sha = api.upload_folder(repo_id="ns/m", folder_path=folder).oid

    # by commit id first, into an empty cache: HEAD + GET on /resolve/<sha>/...
    path = hf_hub_download("ns/m", "model.safetensors", revision=sha)
    assert Path(path).read_bytes() == (folder / "model.safetensors").read_bytes()
    assert f"/ns/m/resolve/{sha}/model.safetensors" in hub_server.request_paths("GET")

    snap = Path(snapshot_download("ns/m"))
    assert snap.name == sha
    got = folder_bytes(snap)
    assert got.pop(".gitattributes")
    assert got == folder_bytes(folder)

    # a later commit moves main; the old commit stays downloadable
    (folder / "config.json").write_text('{"changed": true}')
    sha2 = api.upload_folder(repo_id="ns/m", folder_path=folder).oid
    assert sha2 != sha
    old = hf_hub_download("ns/m", "config.json", revision=sha, cache_dir=tmp_path / "c2")
    new = hf_hub_download("ns/m", "config.json", cache_dir=tmp_path / "c2")
    assert json.loads(Path(old).read_text()) == {"model_type": "llama", "hidden_size": 16}
    assert json.loads(Path(new).read_text()) == {"changed": True}


def test_reupload_of_unchanged_folder_sends_no_bytes(hub_server, tmp_path):
    api = HfApi()
    api.create_repo("ns/m")
    folder = make_folder(tmp_path / "out")
    first = api.upload_folder(repo_id="ns/m", folder_path=folder).oid
    sent, posts = hub_server.uploaded_bytes_total, len(commit_posts(hub_server))
    assert sent == sum(len(v) for v in folder_bytes(folder).values())

    again = api.upload_folder(repo_id="ns/m", folder_path=folder)
    # preupload answered each file's stored git-blob sha1 as `oid` -> the client drops them all and
    # sends no commit at all; it returns the current head (from GET /api/models/ns/m/revision/main)
    assert hub_server.uploaded_bytes_total == sent
    assert len(commit_posts(hub_server)) == posts
    assert again.oid == first == hub_server.head("ns/m")

    # change one file: only that file travels
    (folder / "config.json").write_text('{"v": 2}')
    api.upload_folder(repo_id="ns/m", folder_path=folder)
    assert hub_server.uploaded_bytes_total == sent + len(b'{"v": 2}')


def test_failed_commit_is_atomic(hub_server, tmp_path):
    api = HfApi()
    api.create_repo("ns/m")
    folder = make_folder(tmp_path / "out")
    api.upload_folder(repo_id="ns/m", folder_path=folder)
    before, head = hub_server.files("ns/m"), hub_server.head("ns/m")

    make_folder(folder, value=2.0)
    (folder / "extra.txt").write_text("new")
    hub_server.fail_next_commit = 1
    with pytest.raises(HfHubHTTPError) as exc:
        api.upload_folder(repo_id="ns/m", folder_path=folder)
    assert exc.value.response.status_code == 500
    assert hub_server.fail_next_commit == 0
    assert hub_server.files("ns/m") == before and hub_server.head("ns/m") == head
    # the commit POST is not retried by the client
    assert len(commit_posts(hub_server)) == 2

    api.upload_folder(repo_id="ns/m", folder_path=folder)  # next one goes through
    assert hub_server.files("ns/m")["extra.txt"] == b"new"


def test_private_repo_needs_the_token(hub_server, tmp_path):
    api = HfApi()
    api.create_repo("ns/secret", private=True)
    api.upload_folder(repo_id="ns/secret", folder_path=make_folder(tmp_path / "out"))

    with pytest.raises(RepositoryNotFoundError) as exc:
        hf_hub_download("ns/secret", "config.json", token=False, cache_dir=tmp_path / "anon")
    assert exc.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("ns/secret", token=False, cache_dir=tmp_path / "anon")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("ns/secret", token=False)
    # writes without / with a wrong token
    with pytest.raises(HfHubHTTPError) as exc:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id="ns/secret", token=False)
    assert exc.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_repo("ns/other", token="hf_wrong")
    assert exc.value.response.status_code == 401
    assert "ns/other" not in hub_server.repos
    # with the token (HF_TOKEN set by the fixture) it works
    assert Path(hf_hub_download("ns/secret", "README.md")).read_text() == README
    assert api.whoami()["name"] == hub_server.user


def test_read_only_token_gets_403(tmp_path, monkeypatch):
    from hub_server import patch_hub_env

    with HubServer(read_only_tokens=["hf_read"]) as server:
        patch_hub_env(server, monkeypatch, tmp_path / "home")
        server.add_repo("ns/pub", {"a.txt": "hello"})
        assert Path(hf_hub_download("ns/pub", "a.txt", token="hf_read")).read_text() == "hello"
        with pytest.raises(HfHubHTTPError) as exc:
            HfApi(token="hf_read").upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id="ns/pub")
        assert exc.value.response.status_code == 403


def test_create_pr_branch_and_retry(hub_server, tmp_path, monkeypatch):
    api = HfApi()
    api.create_repo("ns/m")
    folder = make_folder(tmp_path / "out")
    api.upload_folder(repo_id="ns/m", folder_path=folder)
    main = hub_server.files("ns/m")

    (folder / "config.json").write_text('{"pr": 1}')
    pr = api.upload_folder(repo_id="ns/m", folder_path=folder, create_pr=True, commit_message="PR")
    assert pr.pr_url == f"{hub_server.url}/ns/m/discussions/1"
    assert pr.pr_revision == "refs/pr/1" and pr.pr_num == 1
    assert hub_server.files("ns/m") == main
    assert hub_server.files("ns/m", "refs/pr/1")["config.json"] == b'{"pr": 1}'
    got = hf_hub_download("ns/m", "config.json", revision="refs/pr/1")
    assert Path(got).read_bytes() == b'{"pr": 1}'

    api.create_branch("ns/m", branch="v2")
    api.upload_file(path_or_fileobj=b"v2", path_in_repo="notes.txt", repo_id="ns/m", revision="v2")
    assert hub_server.files("ns/m", "v2")["notes.txt"] == b"v2"
    assert "notes.txt" not in hub_server.files("ns/m")
    refs = api.list_repo_refs("ns/m", include_pull_requests=True)
    assert {b.name for b in refs.branches} == {"main", "v2"}
    assert [p.ref for p in refs.pull_requests] == ["refs/pr/1"]

    # a 503 on preupload is retried by the client (http_backoff waits 1 s first: recorded, not slept)
    import time as real_time

    import huggingface_hub.utils._http as hf_http

    sleeps = []

    class _Time:  # huggingface_hub.utils._http does `import time; time.sleep(...)`
        def __getattr__(self, name):
            return getattr(real_time, name)

        @staticmethod
        def sleep(seconds):
            sleeps.append(seconds)

    monkeypatch.setattr(hf_http, "time", _Time())
    hub_server.fail_status_once["/api/models/ns/m/preupload/"] = 503
    before = hub_server.request_paths("POST").count("/api/models/ns/m/preupload/main")
    api.upload_file(path_or_fileobj=b"r", path_in_repo="retry.txt", repo_id="ns/m")
    assert hub_server.files("ns/m")["retry.txt"] == b"r"
    assert hub_server.request_paths("POST").count("/api/models/ns/m/preupload/main") == before + 2
    assert sleeps == [1]
    assert not hub_server.unhandled


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=32,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def test_transformers_push_to_hub_and_from_pretrained(hub_server, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    model.save_pretrained(tmp_path / "tiny")  # the local save the brief asks for; the push saves again
    model.push_to_hub("ns/tiny")
    assert {"config.json", "model.safetensors", "README.md"} <= set(hub_server.files("ns/tiny"))
    assert len(commit_posts(hub_server)) == 1

    loaded = AutoModelForCausalLM.from_pretrained("ns/tiny", dtype=torch.float32)
    ref = model.state_dict()
    got = loaded.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k

    # pushing the same weights again uploads nothing
    sent = hub_server.uploaded_bytes_total
    model.push_to_hub("ns/tiny")
    assert hub_server.uploaded_bytes_total == sent
    assert len(commit_posts(hub_server)) == 1
    assert not hub_server.unhandled, hub_server.unhandled


def test_peft_adapter_round_trip(hub_server):
    from peft import LoraConfig, PeftModel, get_peft_model

    peft_model = get_peft_model(
        tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.push_to_hub("ns/lora")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(hub_server.files("ns/lora"))

    loaded = PeftModel.from_pretrained(tiny_llama(), "ns/lora")
    ref = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    got = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert ref and ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert not hub_server.unhandled, hub_server.unhandled


def test_fixture_patches_the_environment(hub_server):
    from huggingface_hub import constants

    assert os.environ["HF_ENDPOINT"] == hub_server.url == constants.ENDPOINT
    assert constants.HF_HUB_OFFLINE is False and os.environ["HF_HUB_OFFLINE"] == "0"
    assert os.environ["HF_TOKEN"] == hub_server.token
    assert constants.HUGGINGFACE_CO_URL_TEMPLATE.startswith(hub_server.url + "/")
    # module-level helpers (huggingface_hub.create_repo, ...) use a HfApi built at import time
    from huggingface_hub import create_repo

    assert create_repo("ns/via-module-api").repo_id == "ns/via-module-api"
    assert "ns/via-module-api" in hub_server.repos
