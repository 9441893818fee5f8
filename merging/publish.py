"""Publishing a merged model folder to the Hugging Face hub.

    url = push_to_hub("out/merged", "me/my-merge", token=..., private=True)

The hub is asked first whether it is reachable and whether the token is accepted, so an
offline machine or a bad token is said plainly before anything is created. A repo that
this call created is deleted again if the upload fails: a failed push leaves no empty repo.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Union

from .errors import MergeError
from .sources.hub import hub_endpoint, hub_offline, hub_reachable

REPO_NAME = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]{0,95}$")


def check_hub_access(repo: str, token: Optional[str] = None, endpoint: Optional[str] = None) -> str:
    """The full repo id `repo` will have ('name' goes to the token's own namespace), once the
    name is valid, the hub reachable and the token accepted; raises MergeError otherwise.
    Cheap: call it before merging a model only to find it cannot be pushed."""
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hub_errors

    repo = (repo or "").strip()
    if not REPO_NAME.match(repo) or ".." in repo:
        raise MergeError(f"'{repo}' is not a valid repo name (letters, digits, '-', '_', '.'; optionally org/name)")
    if hub_offline():
        raise MergeError("the hub is offline here (HF_HUB_OFFLINE is set): save the model to a folder instead")
    endpoint = endpoint or hub_endpoint()
    if not hub_reachable(endpoint):
        raise MergeError(f"cannot reach the Hugging Face hub at {endpoint}: save the model to a folder instead")
    try:
        user = HfApi(endpoint=endpoint, token=token).whoami()["name"]
    except hub_errors.LocalTokenNotFoundError:
        raise MergeError("log in (or give a token with write access) to push to the hub") from None
    except hub_errors.HfHubHTTPError as error:
        raise MergeError(f"the hub refused the token ({_status(error)})") from None
    return repo if "/" in repo else f"{user}/{repo}"


def push_to_hub(folder: Union[str, Path], repo: str, token: Optional[str] = None, private: bool = True,
                endpoint: Optional[str] = None, message: str = "Upload merged model (MergeLab)") -> str:
    """Upload `folder` to the model repo `repo` ('name' goes to the token's own namespace,
    or 'org/name'), creating it (private unless `private` is False) when it does not exist.
    Returns the repo's URL."""
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hub_errors

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise MergeError(f"'{folder}' is not a model folder (no config.json)")
    endpoint = endpoint or hub_endpoint()
    repo_id = check_hub_access(repo, token, endpoint)
    api = HfApi(endpoint=endpoint, token=token)
    existed = api.repo_exists(repo_id)
    try:
        url = str(api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"))
    except hub_errors.HfHubHTTPError as error:
        raise MergeError(f"cannot create the repo '{repo_id}' ({_status(error)})") from None
    try:
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=message)
    except Exception as error:
        if not existed:  # leave nothing half-made behind
            try:
                api.delete_repo(repo_id, repo_type="model")
            except Exception:
                pass
        cleaned = "; the new repo was deleted again" if not existed else ""
        raise MergeError(f"the upload to '{repo_id}' failed ({type(error).__name__}: {_status(error)}){cleaned}") \
            from None
    return url


def _status(error: Exception) -> str:
    response = getattr(error, "response", None)
    if response is not None:
        return f"HTTP {response.status_code}"
    return str(error).splitlines()[0][:120] if str(error) else type(error).__name__
