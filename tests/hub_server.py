"""In-memory Hugging Face Hub protocol server for tests (no network: 127.0.0.1 only).

The *real* ``huggingface_hub`` client (and transformers / peft on top of it) talks to it when
``HF_ENDPOINT`` (and the constants huggingface_hub derived from it at import time) point at it.
The ``hub_server`` pytest fixture at the bottom of this file does all of that patching.

Usage::

    from hub_server import HubServer, hub_server  # noqa: F401  (tests/ is on sys.path; or import it in conftest.py)

    def test_push(hub_server):
        HfApi().create_repo("ns/name", private=True)
        HfApi().upload_folder(repo_id="ns/name", folder_path=folder)
        assert hub_server.files("ns/name")["config.json"] == b"..."

Protocol notes (huggingface_hub 2.4, see /work/shared/hub-protocol.md):

* Every file is answered ``uploadMode: "regular"`` by preupload, so contents travel base64 inside
  the ndjson commit (no LFS, no Xet). ``oid`` in the preupload answer is the git blob sha1 of the
  file already stored at that path: the client then drops unchanged files from the commit, and if
  nothing changed it sends no commit at all (it calls ``repo_info`` to return the current sha).
* A new repo gets an initial commit holding ``.gitattributes``, like the real Hub (so
  ``snapshot_download`` returns that file too). Pass ``gitattributes=False`` to start empty.
* Auth (only when ``token`` is not None): writes need ``Authorization: Bearer <token>``; a private
  repo answers 401 + ``X-Error-Code: RepoNotFound`` to anonymous reads (the client raises
  ``RepositoryNotFoundError``); any *wrong* bearer token gets 401 "Invalid credentials in
  Authorization header" on every endpoint (as the Hub does); a token in ``read_only_tokens`` may
  read but gets 403 on writes.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import re
import socket
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_TOKEN = "hf_test_token_abc123"

DEFAULT_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_HEX40 = re.compile(r"[0-9a-f]{40}")


def git_blob_sha1(data: bytes) -> str:
    """The git blob id of ``data`` (what the Hub calls a regular file's ``oid`` / ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + ".000Z"


def _truthy(values: list[str] | None) -> bool:
    return bool(values) and values[0].lower() in ("1", "true", "yes")


class LoggedRequest(NamedTuple):
    """One entry of ``HubServer.requests``: a plain 4-tuple with names."""

    method: str
    path: str  # raw request target, query string included
    headers: dict  # Authorization value replaced by "<redacted>"
    body_len: int


class HubError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        error_code: str | None = None,
        body: dict | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.headers = headers or {}
        self.status = status
        self.message = message
        self.error_code = error_code
        self.body = body


class HubServer:
    """A small, thread-safe, in-memory Hub. See the module docstring."""

    def __init__(
        self,
        token: str | None = DEFAULT_TOKEN,
        *,
        user: str = "test-user",
        read_only_tokens: tuple[str, ...] | list[str] = (),
        gitattributes: bool = True,
    ):
        self.token = token
        self.user = user
        self.read_only_tokens = set(read_only_tokens)
        self.gitattributes = gitattributes
        # repo_id -> {"private", "type", "branches": {name: [commit, ...]}, "created_at", "next_pr"}
        # commit = {"oid", "files": {path: bytes} (full snapshot), "summary", "description", "parent", "date"}
        self.repos: dict[str, dict[str, Any]] = {}
        self.requests: list[LoggedRequest] = []
        self.unhandled: list[str] = []  # "METHOD path" of requests no route matched (debug aid)
        self.fail_next_commit = 0
        self.fail_status_once: dict[str, int] = {}
        self.uploaded_bytes_total = 0  # decoded file bytes received in commit POSTs (failed ones included)
        self.commit_posts = 0  # commit POSTs received (failed ones included)
        self.url = ""
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._sockets: set[socket.socket] = set()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "HubServer":
        hub = self
        handler = type("_BoundHubHandler", (_HubHandler,), {"hub": hub})
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        httpd.daemon_threads = True
        httpd.block_on_close = False
        self._httpd = httpd
        self.url = f"http://127.0.0.1:{httpd.server_address[1]}"
        self._thread = threading.Thread(target=httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            for sock in list(self._sockets):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers for tests
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files (path -> bytes) of ``repo_id`` at ``revision`` (branch, refs/pr/N or commit id)."""
        with self._lock:
            return dict(self._resolve(self._repo(repo_id), revision)["files"])

    def head(self, repo_id: str, revision: str = "main") -> str:
        """The commit id ``revision`` points to."""
        with self._lock:
            return self._resolve(self._repo(repo_id), revision)["oid"]

    def commits(self, repo_id: str, revision: str = "main") -> list[dict]:
        """The history of ``revision``, newest first (each a commit dict)."""
        with self._lock:
            repo = self._repo(repo_id)
            return self._history(repo, self._resolve(repo, revision))

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes | str] | None = None,
        *,
        private: bool = False,
        repo_type: str = "model",
        summary: str = "Seed commit",
    ) -> str:
        """Create ``repo_id`` directly (no HTTP) with ``files`` in one commit; returns its commit id."""
        with self._lock:
            repo = self._create_repo(repo_id, private=private, repo_type=repo_type)
            if files:
                base = repo["branches"]["main"][-1]
                new_files = dict(base["files"])
                for path, data in files.items():
                    new_files[path] = data.encode() if isinstance(data, str) else bytes(data)
                commit = self._new_commit(repo_id, base, new_files, summary, "")
                repo["branches"]["main"].append(commit)
            return repo["branches"]["main"][-1]["oid"]

    def request_paths(self, method: str | None = None) -> list[str]:
        """Paths (without query string) of the logged requests, optionally for one method."""
        return [r.path.split("?")[0] for r in list(self.requests) if method is None or r.method == method]

    # ------------------------------------------------------------------ state (call with lock held)
    def _repo(self, repo_id: str, repo_type: str | None = None) -> dict:
        repo = self.repos.get(repo_id)
        if repo is None or (repo_type is not None and repo["type"] != repo_type):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _create_repo(self, repo_id: str, *, private: bool, repo_type: str) -> dict:
        if repo_id in self.repos:
            raise HubError(409, "You already created this repo")
        files = {".gitattributes": DEFAULT_GITATTRIBUTES} if self.gitattributes else {}
        init = self._new_commit(repo_id, None, files, "initial commit", "")
        repo = {
            "private": bool(private),
            "type": repo_type,
            "branches": {"main": [init]},
            "created_at": time.time(),
            "next_pr": 1,
        }
        self.repos[repo_id] = repo
        return repo

    def _new_commit(self, repo_id: str, parent: dict | None, files: dict, summary: str, description: str) -> dict:
        seed = f"{repo_id}\0{parent['oid'] if parent else ''}\0{summary}\0{next(self._counter)}\0{time.time_ns()}"
        return {
            "oid": hashlib.sha1(seed.encode()).hexdigest(),
            "files": files,
            "summary": summary,
            "description": description,
            "parent": parent["oid"] if parent else None,
            "date": time.time(),
        }

    def _all_commits(self, repo: dict) -> dict[str, dict]:
        out = {}
        for commits in repo["branches"].values():
            for c in commits:
                out[c["oid"]] = c
        return out

    def _resolve(self, repo: dict, rev: str | None) -> dict:
        rev = rev or "main"
        if rev.startswith("refs/heads/"):
            rev = rev[len("refs/heads/") :]
        if rev in repo["branches"]:
            return repo["branches"][rev][-1]
        if _HEX40.fullmatch(rev):
            found = self._all_commits(repo).get(rev)
            if found is not None:
                return found
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _history(self, repo: dict, commit: dict) -> list[dict]:
        by_oid = self._all_commits(repo)
        out = []
        cur: dict | None = commit
        while cur is not None:
            out.append(cur)
            cur = by_oid.get(cur["parent"]) if cur["parent"] else None
        return out

    # ------------------------------------------------------------------ auth
    def _auth_level(self, headers) -> str:
        """'write', 'read' or 'anonymous'; raises 401 on a wrong token."""
        if self.token is None:
            return "write"
        value = headers.get("Authorization")
        if not value:
            return "anonymous"
        tok = value[7:].strip() if value.lower().startswith("bearer ") else None
        if tok == self.token:
            return "write"
        if tok is not None and tok in self.read_only_tokens:
            return "read"
        raise HubError(401, "Invalid credentials in Authorization header")

    def _check_write(self, level: str) -> None:
        if level == "anonymous":
            raise HubError(401, "You must be authenticated to access this resource.")
        if level != "write":
            raise HubError(403, "You don't have the rights to write to this repository (read-only token).")

    def _check_read(self, repo: dict, level: str) -> None:
        if repo["private"] and level == "anonymous":
            raise HubError(401, "Invalid username or password.", "RepoNotFound")

    # ------------------------------------------------------------------ dispatch
    def _dispatch(self, method: str, raw_path: str, query: dict, headers, body: bytes):
        segs = [unquote(s) for s in raw_path.strip("/").split("/")] if raw_path.strip("/") else []
        level = self._auth_level(headers)
        if segs[:1] == ["api"]:
            rest = segs[1:]
            if rest == ["repos", "create"] and method == "POST":
                return self._api_create_repo(level, body)
            if rest == ["repos", "delete"] and method == "DELETE":
                return self._api_delete_repo(level, body)
            if rest == ["whoami-v2"] and method == "GET":
                return self._api_whoami(level)
            if rest == ["validate-yaml"] and method == "POST":
                return self._api_validate_yaml(body)
            if rest[:1] == ["telemetry"]:
                return 200, {}, {}
            if len(rest) >= 3 and rest[0] in _REPO_TYPES:
                repo_type = _REPO_TYPES[rest[0]]
                repo_id = f"{rest[1]}/{rest[2]}"
                return self._api_repo(method, repo_type, repo_id, rest[3:], query, level, body)
        else:
            repo_type = "model"
            if segs[:1] in (["datasets"], ["spaces"]):
                repo_type = _REPO_TYPES[segs[0]]
                segs = segs[1:]
            if len(segs) >= 5 and segs[2] in ("resolve", "raw") and method in ("GET", "HEAD"):
                rev, path_parts = _split_revision(segs[3:])
                return self._resolve_file(f"{segs[0]}/{segs[1]}", repo_type, rev, "/".join(path_parts), level, headers)
        self.unhandled.append(f"{method} {raw_path}")
        raise HubError(404, f"Not found: {method} {raw_path}")

    def _api_repo(self, method, repo_type, repo_id, rest, query, level, body):
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            self._check_read(repo, level)
            op = rest[0] if rest else None
            if method == "GET" and op is None:
                return self._info(repo_id, repo, "main", query)
            if method == "GET" and op == "revision" and len(rest) >= 2:
                return self._info(repo_id, repo, "/".join(rest[1:]), query)
            if method == "GET" and op == "tree" and len(rest) >= 2:
                rev, path_parts = _split_revision(rest[1:])
                return self._tree(repo, rev, "/".join(path_parts), query)
            if method == "POST" and op == "paths-info" and len(rest) >= 2:
                return self._paths_info(repo, "/".join(rest[1:]), body)
            if method == "GET" and op == "refs":
                return self._refs(repo, query)
            if method == "GET" and op == "commits" and len(rest) >= 2:
                return self._commit_list(repo, "/".join(rest[1:]))
            # --- writes
            if method == "POST" and op == "preupload" and len(rest) >= 2:
                self._check_write(level)
                return self._preupload(repo, "/".join(rest[1:]), body)
            if method == "POST" and op == "commit" and len(rest) >= 2:
                self._check_write(level)
                return self._commit(repo_id, repo, "/".join(rest[1:]), query, body)
            if method in ("POST", "DELETE") and op == "branch" and len(rest) >= 2:
                self._check_write(level)
                return self._branch(repo, method, "/".join(rest[1:]), body)
            if method == "PUT" and op == "settings":
                self._check_write(level)
                return self._settings(repo, body)
        self.unhandled.append(f"{method} /api/{repo_type}s/{repo_id}/{'/'.join(rest)}")
        raise HubError(404, f"Not found: {method} {'/'.join(rest)}")

    # ------------------------------------------------------------------ endpoints
    def _api_create_repo(self, level, body):
        self._check_write(level)
        payload = json.loads(body or b"{}")
        name = payload.get("name")
        if not name:
            raise HubError(400, "Missing repo name")
        repo_id = f"{payload.get('organization') or self.user}/{name}"
        repo_type = payload.get("type") or "model"
        private = payload.get("private")
        if private is None:
            private = payload.get("visibility") == "private"
        url = f"{self.url}/{_URL_PREFIX.get(repo_type, '')}{repo_id}"
        with self._lock:
            if repo_id in self.repos:
                raise HubError(409, "You already created this model repo", body={"error": "You already created this model repo", "url": url})
            self._create_repo(repo_id, private=bool(private), repo_type=repo_type)
        return 200, {}, {"url": url, "name": repo_id, "id": repo_id}

    def _api_delete_repo(self, level, body):
        self._check_write(level)
        payload = json.loads(body or b"{}")
        repo_id = f"{payload.get('organization') or self.user}/{payload.get('name')}"
        with self._lock:
            self._repo(repo_id, payload.get("type") or "model")
            del self.repos[repo_id]
        return 200, {}, {}

    def _api_whoami(self, level):
        if level == "anonymous":
            raise HubError(401, "Invalid username or password.")
        return 200, {}, {
            "type": "user",
            "id": "0" * 24,
            "name": self.user,
            "fullname": "Test User",
            "email": None,
            "emailVerified": True,
            "canPay": False,
            "isPro": False,
            "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "test-token", "role": level}},
        }

    def _api_validate_yaml(self, body):
        payload = json.loads(body or b"{}")
        content = payload.get("content") or ""
        try:
            _parse_card_data(content, strict=True)
        except Exception as e:  # noqa: BLE001
            return 400, {}, {"errors": [{"message": f"Invalid YAML metadata: {e}"}], "warnings": []}
        return 200, {}, {"errors": [], "warnings": []}

    def _info(self, repo_id, repo, rev, query):
        commit = self._resolve(repo, rev)
        with_blobs = _truthy(query.get("blobs"))
        siblings = []
        for path in sorted(commit["files"]):
            sib: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                data = commit["files"][path]
                sib.update(size=len(data), blobId=git_blob_sha1(data))
            siblings.append(sib)
        card = _parse_card_data(commit["files"].get("README.md", b"").decode("utf-8", "replace"))
        tags = list(card.get("tags") or []) if isinstance(card, dict) else []
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit["oid"],
            "lastModified": _iso(commit["date"]),
            "createdAt": _iso(repo["created_at"]),
            "private": repo["private"],
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": tags,
            "siblings": siblings,
            "usedStorage": sum(len(v) for v in commit["files"].values()),
        }
        if repo["type"] == "model":
            info["modelId"] = repo_id
        if card:
            info["cardData"] = card
            if isinstance(card, dict) and card.get("library_name"):
                info["library_name"] = card["library_name"]
        return 200, {}, info

    def _entry(self, repo, commit, path, is_dir, expand):
        files = commit["files"]
        if is_dir:
            under = sorted(p for p in files if p.startswith(path + "/"))
            digest = hashlib.sha1("\n".join(f"{p}:{git_blob_sha1(files[p])}" for p in under).encode()).hexdigest()
            entry: dict[str, Any] = {"type": "directory", "oid": digest, "size": 0, "path": path}
        else:
            data = files[path]
            entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
        if expand:
            last = self._last_commit_touching(repo, commit, path, is_dir)
            entry["lastCommit"] = {"id": last["oid"], "title": last["summary"], "date": _iso(last["date"])}
        return entry

    def _last_commit_touching(self, repo, commit, path, is_dir):
        def view(c):
            if is_dir:
                return {p: v for p, v in c["files"].items() if p.startswith(path + "/")}
            return c["files"].get(path)

        history = self._history(repo, commit)
        current = view(commit)
        last = commit
        for older in history[1:]:
            if view(older) != current:
                break
            last = older
        return last

    def _tree(self, repo, rev, path, query):
        commit = self._resolve(repo, rev)
        files = commit["files"]
        prefix = path.strip("/")
        recursive = _truthy(query.get("recursive"))
        expand = _truthy(query.get("expand"))
        if prefix and prefix in files:
            raise HubError(404, f"{prefix} is a file, not a directory", "EntryNotFound")
        dirs: set[str] = set()
        file_paths: list[str] = []
        for p in files:
            if prefix and not p.startswith(prefix + "/"):
                continue
            rel = p[len(prefix) + 1 :] if prefix else p
            parts = rel.split("/")
            if recursive:
                file_paths.append(p)
                for i in range(1, len(parts)):
                    dirs.add("/".join(([prefix] if prefix else []) + parts[:i]))
            elif len(parts) == 1:
                file_paths.append(p)
            else:
                dirs.add("/".join(([prefix] if prefix else []) + parts[:1]))
        if prefix and not file_paths and not dirs:
            raise HubError(404, f"{prefix} does not exist on \"{rev}\"", "EntryNotFound")
        entries = [self._entry(repo, commit, d, True, expand) for d in sorted(dirs)]
        entries += [self._entry(repo, commit, p, False, expand) for p in sorted(file_paths)]
        return 200, {}, entries

    def _paths_info(self, repo, rev, body):
        commit = self._resolve(repo, rev)
        try:
            payload = json.loads(body)
            paths, expand = payload.get("paths", []), bool(payload.get("expand"))
        except ValueError:
            form = parse_qs(body.decode(), keep_blank_values=True)
            paths, expand = form.get("paths", []), _truthy(form.get("expand"))
        if isinstance(paths, str):
            paths = [paths]
        out = []
        for p in paths:
            p = p.strip("/")
            if p in commit["files"]:
                out.append(self._entry(repo, commit, p, False, expand))
            elif any(f.startswith(p + "/") for f in commit["files"]):
                out.append(self._entry(repo, commit, p, True, expand))
        return 200, {}, out

    def _refs(self, repo, query):
        branches, prs = [], []
        for name, commits in repo["branches"].items():
            if name.startswith("refs/pr/"):
                prs.append({"name": name, "ref": name, "targetCommit": commits[-1]["oid"]})
            else:
                branches.append({"name": name, "ref": f"refs/heads/{name}", "targetCommit": commits[-1]["oid"]})
        out: dict[str, Any] = {"branches": branches, "converts": [], "tags": []}
        if _truthy(query.get("include_prs")):
            out["pullRequests"] = prs
        return 200, {}, out

    def _commit_list(self, repo, rev):
        commit = self._resolve(repo, rev)
        return 200, {}, [
            {
                "id": c["oid"],
                "title": c["summary"],
                "message": c["description"],
                "authors": [{"user": self.user}],
                "date": _iso(c["date"]),
            }
            for c in self._history(repo, commit)
        ]

    def _preupload(self, repo, rev, body):
        commit = self._resolve(repo, rev)
        payload = json.loads(body or b"{}")
        out = []
        for f in payload.get("files", []):
            stored = commit["files"].get(f["path"])
            out.append(
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_sha1(stored) if stored is not None else None,
                }
            )
        return 200, {}, {"files": out, "commitOid": commit["oid"]}

    def _commit(self, repo_id, repo, rev, query, body):
        items = [json.loads(line) for line in body.splitlines() if line.strip()]
        self.commit_posts += 1
        # Count received content before anything can fail (it *was* uploaded).
        for item in items:
            if item.get("key") == "file":
                self.uploaded_bytes_total += len(_decode_content(item["value"]))
        if self.fail_next_commit > 0:
            self.fail_next_commit -= 1
            raise HubError(500, "Internal Error - injected commit failure (HubServer.fail_next_commit)")
        if not items or items[0].get("key") != "header":
            raise HubError(400, "First line of the commit payload must be the header")
        header = items[0]["value"]
        summary = header.get("summary") or ""
        if not summary:
            raise HubError(400, "Commit summary must not be empty")
        create_pr = _truthy(query.get("create_pr"))
        rev = rev[len("refs/heads/") :] if rev.startswith("refs/heads/") else rev
        if rev not in repo["branches"]:
            if _HEX40.fullmatch(rev):
                raise HubError(400, f"Invalid rev id: {rev} is not a branch")
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        base = repo["branches"][rev][-1]
        parent_commit = header.get("parentCommit")
        if parent_commit is not None and parent_commit != base["oid"]:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        new_files = dict(base["files"])
        for item in items[1:]:
            key, value = item.get("key"), item.get("value") or {}
            path = (value.get("path") or "").strip("/")
            if key == "file":
                new_files[path] = _decode_content(value)
            elif key == "deletedFile":
                if path not in new_files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del new_files[path]
            elif key == "deletedFolder":
                doomed = [p for p in new_files if p.startswith(path + "/")]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del new_files[p]
            elif key == "lfsFile":
                raise HubError(400, "This test server only accepts regular (base64) files, not LFS pointers")
            else:
                raise HubError(400, f"Unknown commit operation key: {key!r}")
        commit = self._new_commit(repo_id, base, new_files, summary, header.get("description") or "")
        prefix = f"{self.url}/{_URL_PREFIX.get(repo['type'], '')}{repo_id}"
        out: dict[str, Any] = {
            "success": True,
            "commitOid": commit["oid"],
            "commitUrl": f"{prefix}/commit/{commit['oid']}",
            "hookOutput": "",
        }
        if create_pr:
            num = repo["next_pr"]
            repo["next_pr"] += 1
            repo["branches"][f"refs/pr/{num}"] = list(repo["branches"][rev]) + [commit]
            out["pullRequestUrl"] = f"{prefix}/discussions/{num}"
        else:
            repo["branches"][rev].append(commit)
        return 200, {}, out

    def _branch(self, repo, method, branch, body):
        if method == "DELETE":
            if branch not in repo["branches"]:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if branch == "main":
                raise HubError(403, "Cannot delete the default branch")
            del repo["branches"][branch]
            return 200, {}, {}
        if branch.startswith("refs/") or not branch:
            raise HubError(400, f"Invalid reference for a branch: {branch}")
        if branch in repo["branches"]:
            raise HubError(409, "Reference already exists")
        payload = json.loads(body) if body.strip() else {}
        start = self._resolve(repo, payload.get("startingPoint") or "main")
        repo["branches"][branch] = list(reversed(self._history(repo, start)))
        return 200, {}, {}

    def _settings(self, repo, body):
        payload = json.loads(body or b"{}")
        if "private" in payload:
            repo["private"] = bool(payload["private"])
        if "visibility" in payload:
            repo["private"] = payload["visibility"] == "private"
        return 200, {}, {}

    def _resolve_file(self, repo_id, repo_type, rev, path, level, headers):
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            self._check_read(repo, level)
            commit = self._resolve(repo, rev)
            data = commit["files"].get(path)
            if data is None:
                # Like the Hub, tell which commit was searched: the client then caches the absence
                # (<cache>/.no_exist/<commit>/<path>) and does not ask again for that commit.
                raise HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": commit["oid"]})
            oid = commit["oid"]
        out_headers = {
            "X-Repo-Commit": oid,
            "ETag": f'"{git_blob_sha1(data)}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        rng = headers.get("Range")
        if rng:
            m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", rng)
            if m and (m.group(1) or m.group(2)):
                total = len(data)
                if m.group(1):
                    start = int(m.group(1))
                    end = min(int(m.group(2)), total - 1) if m.group(2) else total - 1
                else:  # suffix range: last N bytes
                    start, end = max(total - int(m.group(2)), 0), total - 1
                if start >= total or start > end:
                    return 416, {**out_headers, "Content-Range": f"bytes */{total}"}, b""
                out_headers["Content-Range"] = f"bytes {start}-{end}/{total}"
                return 206, out_headers, data[start : end + 1]
        return 200, out_headers, data


def _split_revision(parts: list[str]) -> tuple[str, list[str]]:
    """Split already-unquoted path segments into (revision, rest) for tree/resolve URLs.

    The client quotes revisions with safe="" (``refs%2Fpr%2F1`` stays one segment); an unquoted
    ``refs/pr/1`` / ``refs/heads/x`` / ``refs/convert/x`` is also accepted.
    """
    if parts and parts[0] == "refs" and len(parts) >= 3:
        return "/".join(parts[:3]), parts[3:]
    return (parts[0] if parts else "main"), parts[1:]


def _decode_content(value: dict) -> bytes:
    content = value.get("content") or ""
    if value.get("encoding") == "base64":
        return base64.b64decode(content)
    return content.encode("utf-8")


def _parse_card_data(text: str, strict: bool = False) -> dict:
    """YAML front matter of a README (``{}`` if none)."""
    m = re.match(r"^\s*---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", text, re.S)
    if not m:
        return {}
    try:
        import yaml

        data = yaml.safe_load(m.group(1))
    except Exception:
        if strict:
            raise
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        if strict:
            raise ValueError("metadata must be a YAML mapping")
        return {}
    return data


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "HubServer/1.0"
    hub: HubServer  # set on the bound subclass

    def log_message(self, format, *args):  # noqa: A002 - silence stderr logging
        pass

    def setup(self):
        super().setup()
        with self.hub._lock:
            self.hub._sockets.add(self.connection)

    def finish(self):
        try:
            super().finish()
        finally:
            with self.hub._lock:
                self.hub._sockets.discard(self.connection)

    def do_GET(self):
        self._handle("GET")

    def do_HEAD(self):
        self._handle("HEAD")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    def do_DELETE(self):
        self._handle("DELETE")

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size_line = self.rfile.readline()
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self, method: str) -> None:
        hub = self.hub
        body = self._read_body()
        split = urlsplit(self.path)
        query = parse_qs(split.query, keep_blank_values=True)
        logged_headers = {k: ("<redacted>" if k.lower() == "authorization" else v) for k, v in self.headers.items()}
        with hub._lock:
            hub.requests.append(LoggedRequest(method, self.path, logged_headers, len(body)))
            forced = None
            for prefix in list(hub.fail_status_once):
                if split.path.startswith(prefix) or unquote(split.path).startswith(prefix):
                    forced = hub.fail_status_once.pop(prefix)
                    break
        try:
            if forced is not None:
                raise HubError(forced, f"Injected failure (HubServer.fail_status_once) for {split.path}")
            status, headers, payload = hub._dispatch(method, split.path, query, self.headers, body)
        except HubError as e:
            headers = {**e.headers, "X-Error-Message": e.message}
            if e.error_code:
                headers["X-Error-Code"] = e.error_code
            status, payload = e.status, (e.body if e.body is not None else {"error": e.message})
        except Exception as e:  # noqa: BLE001 - report server bugs as 500 with the traceback
            traceback.print_exc()
            status, headers, payload = 500, {"X-Error-Message": f"HubServer bug: {e!r}"}, {"error": repr(e)}
        self._send(method, status, headers, payload)

    def _send(self, method: str, status: int, headers: dict, payload) -> None:
        if isinstance(payload, (bytes, bytearray)):
            data = bytes(payload)
        else:
            data = json.dumps(payload).encode()
            headers = {"Content-Type": "application/json; charset=utf-8", **headers}
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, str(v).replace("\r", " ").replace("\n", " "))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)


# ---------------------------------------------------------------------- pytest integration
def patch_hub_env(server: HubServer, monkeypatch, hf_home) -> None:
    """Point huggingface_hub / transformers / peft at ``server`` for the duration of ``monkeypatch``.

    Sets the environment *and* the module-level values huggingface_hub computed at import time
    (``constants.ENDPOINT`` and friends), so it works whether or not huggingface_hub was already
    imported, and overrides a global ``HF_HUB_OFFLINE=1``.
    """
    import os
    import sys

    hf_home = os.fspath(hf_home)
    hub_cache = os.path.join(hf_home, "hub")
    assets_cache = os.path.join(hf_home, "assets")
    os.makedirs(hub_cache, exist_ok=True)
    env = {
        "HF_ENDPOINT": server.url,
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HOME": hf_home,
        "HF_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": assets_cache,
        "HF_TOKEN_PATH": os.path.join(hf_home, "token"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_ETAG_TIMEOUT": "5",
        "HF_HUB_DOWNLOAD_TIMEOUT": "10",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HUGGINGFACE_HUB_CACHE", "HUGGINGFACE_ASSETS_CACHE", "HF_OIDC_RESOURCE",
                "HUGGING_FACE_HUB_TOKEN", "HF_HUB_DISABLE_IMPLICIT_TOKEN", "HF_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    if server.token is not None:
        monkeypatch.setenv("HF_TOKEN", server.token)

    from urllib.parse import urlsplit as _urlsplit

    from huggingface_hub import constants

    host = _urlsplit(server.url).hostname
    values = {
        "ENDPOINT": server.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset(getattr(constants, "HF_URL_HOSTS", frozenset()) | {host}),
        "HF_HUB_OFFLINE": False,
        "HF_HOME": hf_home,
        "HF_HUB_CACHE": hub_cache,
        "HUGGINGFACE_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": assets_cache,
        "HUGGINGFACE_ASSETS_CACHE": assets_cache,
        "HF_TOKEN_PATH": os.path.join(hf_home, "token"),
        "HF_STORED_TOKENS_PATH": os.path.join(hf_home, "stored_tokens"),
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "HF_HUB_ETAG_TIMEOUT": 5,
        "HF_HUB_DOWNLOAD_TIMEOUT": 10,
    }
    for name, value in values.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    # `from .constants import X` copies taken at import time.
    for mod_name, attr, value in (
        ("huggingface_hub.utils._cache_manager", "HF_HUB_CACHE", hub_cache),
        ("huggingface_hub.utils._cache_assets", "HF_ASSETS_CACHE", assets_cache),
    ):
        mod = sys.modules.get(mod_name)
        if mod is not None and hasattr(mod, attr):
            monkeypatch.setattr(mod, attr, value)
    # Auth header forwarding on redirects is limited to Hub origins computed at import time.
    http_mod = sys.modules.get("huggingface_hub.utils._http")
    if http_mod is not None and hasattr(http_mod, "_HUB_ORIGINS") and hasattr(http_mod, "_url_origin"):
        monkeypatch.setattr(http_mod, "_HUB_ORIGINS", frozenset(http_mod._HUB_ORIGINS | {http_mod._url_origin(server.url)}))
    # Module-level `api = HfApi()` behind huggingface_hub.create_repo / upload_folder / ... captured ENDPOINT.
    hf_api_mod = sys.modules.get("huggingface_hub.hf_api")
    if hf_api_mod is not None and hasattr(hf_api_mod, "api"):
        monkeypatch.setattr(hf_api_mod.api, "endpoint", server.url)
    # transformers caches one HfApi (with its endpoint) lazily.
    tf_hub = sys.modules.get("transformers.utils.hub")
    if tf_hub is not None and hasattr(tf_hub, "_hf_api"):
        monkeypatch.setattr(tf_hub, "_hf_api", None)


try:
    import pytest
except ImportError:  # pragma: no cover - the server itself does not need pytest
    pytest = None

if pytest is not None:

    @pytest.fixture
    def hub_server(monkeypatch, tmp_path):
        """A started ``HubServer`` with huggingface_hub/transformers/peft pointed at it (see patch_hub_env)."""
        server = HubServer().start()
        try:
            patch_hub_env(server, monkeypatch, tmp_path / "hf_home")
            yield server
        finally:
            # transformers' cached HfApi may now hold this server's URL: drop it after the test too.
            monkeypatch.undo()
            import sys

            tf_hub = sys.modules.get("transformers.utils.hub")
            if tf_hub is not None and hasattr(tf_hub, "_hf_api"):
                tf_hub._hf_api = None
            server.stop()
