"""Push a saved checkpoint folder to the Hugging Face Hub as one commit.

``push_to_hub`` creates the repo if needed (``exist_ok``), creates the branch for a non-``main`` revision,
then uploads the folder in a single ``upload_folder`` commit, so the repo never shows half an upload.
Transient failures (HTTP 5xx/429, connection errors, timeouts) are retried with exponential backoff; a
rejected token or an unreachable endpoint ends in a :class:`HubPushError` that says what to fix. The local
folder is only read.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
import time
from collections.abc import Callable
from typing import TypeVar

import httpx2
from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from ..errors import ConfigError, HfPxError

logger = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_COMMIT_MESSAGE = "Upload pruned model with hf-px"
# never part of a checkpoint: save_pretrained's temp folders and local caches
IGNORE_PATTERNS = [".*.tmp-*", ".*.tmp-*/**", ".*.old-*/**", ".cache/**", ".git/**", "__pycache__/**"]
BACKOFF_S = 1.0
# the Hub's rule for each half of "namespace/name": word characters, '-' and '.', not at either end, <= 96
_REPO_PART = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
REPO_ID = re.compile(rf"^{_REPO_PART}/{_REPO_PART}$")


class HubPushError(HfPxError, RuntimeError):
    """A push that cannot succeed as asked: bad token, unreachable endpoint, or repeated server errors."""


def check_repo_id(repo_id: str | None, where: str) -> None:
    """Refuse anything but ``namespace/name`` before any work is done; ``where`` names the flag or config key.

    Example:
        >>> check_repo_id("user/minilm-px90", "push.hub_model_id")
    """
    text = repo_id if isinstance(repo_id, str) else ""
    if REPO_ID.match(text) and ".." not in text and "--" not in text:
        return
    shown = repr(repo_id) if len(repr(repo_id)) <= 80 else repr(repo_id)[:77] + "..."
    raise ConfigError(f"{where} {shown} is not a Hub repo id of the form namespace/name (letters, digits, '-', '_', "
                     f"'.', no '..' or '--'); e.g. {where}: user/minilm-px90.")


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _http_cause(err: BaseException) -> BaseException | None:
    """The HTTP or network error behind ``err``: huggingface_hub wraps LFS upload failures in a RuntimeError."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, (HfHubHTTPError, httpx2.HTTPError, OSError)):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _transient(err: BaseException) -> bool:
    if isinstance(err, (httpx2.TransportError, ConnectionError, TimeoutError)):
        return True
    status = _status(err)
    return status is not None and (status >= 500 or status == 429)


def _explain(err: BaseException, endpoint: str, repo_id: str) -> str:
    status = _status(err)
    if isinstance(err, (httpx2.ConnectError, httpx2.TimeoutException, ConnectionError, TimeoutError)):
        return (
            f"cannot reach the Hub endpoint {endpoint} ({type(err).__name__}: {_one_line(err)}). Check the network, "
            "HF_ENDPOINT, and that HF_HUB_OFFLINE is not set."
        )
    if status == 401 or (isinstance(err, RepositoryNotFoundError) and status in (401, 403)):
        return (
            f"the Hub at {endpoint} rejected the token (HTTP {status}). Set a valid write token in HF_TOKEN "
            "or run `hf auth login`."
        )
    if status == 403:
        return (
            f"the token has no write access to '{repo_id}' at {endpoint} (HTTP 403). Use a token with write "
            "permission for that namespace."
        )
    if status is not None and (status >= 500 or status == 429):
        return f"the Hub at {endpoint} kept failing (HTTP {status}); try again later. Last error: {_one_line(err)}"
    return f"push of '{repo_id}' to {endpoint} failed: {_one_line(err)}"


def _with_retries(fn: Callable[[], T], what: str, endpoint: str, repo_id: str, max_retries: int) -> T:
    for attempt in range(max_retries + 1):
        try:
            return fn()
        except (HfHubHTTPError, httpx2.HTTPError, OSError, RuntimeError) as err:
            cause = _http_cause(err)
            if cause is None:
                raise
            if not _transient(cause) or attempt == max_retries:
                where = f"{what} ({_one_line(err, 120)})" if cause is not err else what
                raise HubPushError(f"{where}: {_explain(cause, endpoint, repo_id)}") from err
            wait = BACKOFF_S * 2**attempt
            logger.warning("%s failed (%s); retry %d/%d in %.1f s", what, err, attempt + 1, max_retries, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    max_retries: int = 3,
) -> str:
    """Upload a checkpoint folder to ``repo_id`` in one commit and return the commit URL.

    Args:
        folder: a folder written by ``hf_px.save_pretrained`` (or any model folder).
        repo_id: ``"user/name"``; created if missing.
        private: create the repo private (an existing repo keeps its visibility).
        revision: branch to commit to; created from ``main`` if it does not exist.
        commit_message: defaults to ``"Upload pruned model with hf-px"``.
        token: defaults to ``HF_TOKEN`` or the token saved by ``hf auth login``.
        endpoint: defaults to ``HF_ENDPOINT``, else huggingface.co.
        max_retries: retries of each request on transient errors, with exponential backoff.

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
        HubPushError: no or rejected token, unreachable endpoint, or persistent server errors.

    Example:
        >>> url = push_to_hub("out/", "user/minilm-px90", private=True)   # doctest: +SKIP
    """
    check_repo_id(repo_id, "repo_id")
    path = pathlib.Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"'{folder}' is not a folder; save the model first (save_pretrained).")
    if not any(path.iterdir()):
        raise ValueError(f"'{folder}' is empty; nothing to push.")
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    token = token or get_token()
    if not token:
        raise HubPushError(f"no Hub token found for {endpoint}: set HF_TOKEN or run `hf auth login`.")
    api = HfApi(endpoint=endpoint, token=token)

    def retry(fn: Callable[[], T], what: str) -> T:
        return _with_retries(fn, what, endpoint, repo_id, max_retries)

    retry(lambda: api.create_repo(repo_id, private=private, exist_ok=True), f"create repo '{repo_id}'")
    if revision and revision != constants.DEFAULT_REVISION:
        retry(lambda: api.create_branch(repo_id, branch=revision, exist_ok=True), f"create branch '{revision}'")
    info = retry(
        lambda: api.upload_folder(
            repo_id=repo_id, folder_path=path, revision=revision,
            commit_message=commit_message or DEFAULT_COMMIT_MESSAGE, ignore_patterns=IGNORE_PATTERNS,
        ),
        f"upload '{folder}'",
    )
    return info.commit_url
