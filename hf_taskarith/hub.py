"""Push merged models and adapters to the Hub in one commit."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

from .errors import TaskArithError

logger = logging.getLogger(__name__)


class PushError(TaskArithError):
    """A push to the Hub failed; the remote repo was left as it was."""


RETRY_STATUS = {500, 502, 503, 504}
RETRY_DELAYS = (1.0, 2.0, 4.0)


def _with_retries(upload):
    """Retry a whole commit on transient 5xx / connection errors.

    huggingface_hub retries preupload calls (``http_backoff``) but posts the commit once; a failed
    commit stores nothing on the Hub, so sending it again is safe.
    """
    import time

    from huggingface_hub.errors import HfHubHTTPError

    for attempt, delay in enumerate((*RETRY_DELAYS, None)):
        try:
            return upload()
        except HfHubHTTPError as err:
            status = getattr(getattr(err, "response", None), "status_code", None)
            if delay is None or status not in RETRY_STATUS:
                raise
            logger.warning("Hub answered HTTP %s; retrying the commit in %.0fs (attempt %d)", status, delay, attempt + 2)
        except (ConnectionError, OSError) as err:
            if delay is None:
                raise
            logger.warning("connection error (%s); retrying the commit in %.0fs", type(err).__name__, delay)
        time.sleep(delay)


def push_folder(
    folder: Union[str, Path],
    repo_id: str,
    *,
    private: Optional[bool] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    commit_message: Optional[str] = None,
    token: Union[str, bool, None] = None,
) -> str:
    """Upload a merged model or adapter folder to ``repo_id`` as ONE commit.

    The repo is created if missing. huggingface_hub's commit API sends every file in a single
    commit, so a failure leaves the remote as it was; files whose content is already there are
    skipped by the client (same git blob sha).

    Args:
        folder: The output folder (``save_pretrained`` result).
        repo_id: ``namespace/name``.
        private: Visibility for a newly created repo.
        revision: Branch to commit to (created from main if missing).
        create_pr: Open a pull request instead of committing to the branch.
        commit_message: Commit summary.
        token: Hub token (default: ``HF_TOKEN`` or the saved login). Never logged.

    Returns:
        The commit URL (or pull-request URL).

    Raises:
        PushError: with a clear reason for 401, 403, 404 and other failures.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    folder = Path(folder)
    if not folder.is_dir():
        raise PushError(f"{folder}: not a folder to push")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = _with_retries(
            lambda: api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                revision=revision,
                create_pr=create_pr,
                commit_message=commit_message or "Upload merge made with hf_taskarith",
            )
        )
    except RepositoryNotFoundError:
        raise PushError(f"{repo_id}: repository not found, or your token cannot see it (check the namespace and HF_TOKEN)") from None
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status == 401:
            raise PushError(f"{repo_id}: authentication failed (HTTP 401): set HF_TOKEN or log in with `hf auth login`") from None
        if status == 403:
            raise PushError(f"{repo_id}: permission denied (HTTP 403): the token has no write access to this repo or namespace") from None
        if status == 404:
            raise PushError(f"{repo_id}: not found (HTTP 404): check the repo id and revision {revision!r}") from None
        raise PushError(f"{repo_id}: push failed (HTTP {status}); the remote repo was not changed") from None
    except (OSError, ConnectionError) as err:
        raise PushError(f"{repo_id}: push failed ({type(err).__name__}); the remote repo was not changed") from None
    url = getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or str(info)
    logger.info("Pushed %s to %s", folder, url)
    return url
