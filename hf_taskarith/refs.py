"""Model references: ``org/name``, ``org/name@revision`` or a local folder.

Hub references resolve through :func:`huggingface_hub.snapshot_download`, restricted with
``allow_patterns`` to the files a merge needs, and honour ``HF_TOKEN``, ``HF_HUB_OFFLINE`` and
the normal cache. The resolved commit sha is kept: the model card records it.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from .errors import ModelReferenceError

logger = logging.getLogger(__name__)

# What a merge needs from a repo: weights (safetensors first), configs, tokenizer, adapter files.
WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
PICKLE_WEIGHT_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json", "adapter_model.bin"]
META_PATTERNS = [
    "config.json",
    "generation_config.json",
    "adapter_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
    "README.md",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_SHA = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference resolved to a local folder.

    Attributes:
        path: Local folder holding the files.
        ref: The reference as the user wrote it.
        repo_id: Hub repo id, or ``None`` for a local folder.
        revision: The revision asked for (branch, tag or sha), or ``None``.
        commit_sha: The resolved 40-hex commit, or ``None`` for a local folder.
    """

    path: Path
    ref: str
    repo_id: Optional[str] = None
    revision: Optional[str] = None
    commit_sha: Optional[str] = None

    @property
    def display_name(self) -> str:
        """A name safe to publish: the Hub id, or a local folder's name (never its absolute path)."""
        return self.repo_id if self.repo_id else self.path.name

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None


def parse_ref(ref: str) -> tuple[str, Optional[str]]:
    """Split ``org/name@revision`` into ``(repo_id, revision)``.

    Raises:
        ModelReferenceError: if the text is not a valid Hub id.
    """
    repo_id, _, revision = ref.partition("@")
    if not repo_id or not _HUB_ID.match(repo_id) or (ref.endswith("@")):
        raise ModelReferenceError(
            f"{ref!r} is neither an existing local folder nor a Hub id of the form org/name[@revision]"
        )
    return repo_id, (revision or None)


def resolve(
    ref: Union[str, os.PathLike, ResolvedModel],
    *,
    token: Union[str, bool, None] = None,
    cache_dir: Union[str, os.PathLike, None] = None,
    allow_pickle_weights: bool = True,
) -> ResolvedModel:
    """Resolve a model reference to a local folder, downloading only what a merge needs.

    Args:
        ref: A local folder, ``org/name`` or ``org/name@revision``.
        token: Hub token; ``None`` uses ``HF_TOKEN`` or the saved login (huggingface_hub's default).
        cache_dir: Hub cache folder; ``None`` uses the normal cache (``HF_HOME``).
        allow_pickle_weights: Also fetch ``.bin`` weights when the repo has no safetensors.

    Returns:
        The resolved model, with the commit sha for Hub references.

    Raises:
        ModelReferenceError: if the folder does not exist, the repo or revision is unknown,
            access is denied, or the files are not in the offline cache.
    """
    if isinstance(ref, ResolvedModel):
        return ref
    ref_str = os.fspath(ref)
    local = Path(ref_str).expanduser()
    if local.is_dir():
        return ResolvedModel(path=local.resolve(), ref=ref_str)
    if local.exists():
        raise ModelReferenceError(f"{ref_str!r} is a file; a model reference must be a folder or a Hub id")
    if ref_str.startswith((".", "/", "~")) or os.sep in ref_str.replace("/", "", 1):
        raise ModelReferenceError(f"local folder {ref_str!r} does not exist")
    repo_id, revision = parse_ref(ref_str)

    path = _download(repo_id, revision, WEIGHT_PATTERNS + META_PATTERNS, token, cache_dir)
    if allow_pickle_weights and not any(path.glob("*.safetensors")):
        # Old repos only have pickle checkpoints; they are loaded with weights_only=True later.
        path = _download(repo_id, revision, PICKLE_WEIGHT_PATTERNS + META_PATTERNS, token, cache_dir)
    sha = path.name if _SHA.match(path.name) else None
    return ResolvedModel(path=path, ref=ref_str, repo_id=repo_id, revision=revision, commit_sha=sha)


def _download(repo_id, revision, patterns, token, cache_dir) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=patterns,
                token=token,
                cache_dir=cache_dir,
            )
        )
    except RevisionNotFoundError:
        raise ModelReferenceError(f"{where}: revision {revision!r} not found on the Hub") from None
    except GatedRepoError:
        raise ModelReferenceError(f"{where}: the repo is gated; accept its terms and log in (HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ModelReferenceError(
            f"{where}: repo not found, or private and no valid token was given (set HF_TOKEN or log in)"
        ) from None
    except LocalEntryNotFoundError:
        raise ModelReferenceError(
            f"{where}: not in the local Hub cache and the Hub cannot be reached (HF_HUB_OFFLINE is set or no network)"
        ) from None
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        raise ModelReferenceError(f"{where}: download failed (HTTP {status})") from None
