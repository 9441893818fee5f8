"""Models on the Hugging Face hub: snapshots in the cache or downloaded (config, tokenizer and
safetensors only), headers read remotely when weights are not needed yet, and the checks
that a public deployment's visitor may read a repo (merging.access)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..access import current_access, hub_token
from ..errors import MergeError
from .local import open_folder
from .tensors import SAFETENSORS_DTYPES, Checkpoint, TensorInfo, read_config

# The files a merge needs from a hub repo: config, weights, tokenizer. Not .bin/.gguf/onnx.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "merges.txt", "vocab.txt",
                "*.jinja", "*.tiktoken"]
HUB_SMALL_PATTERNS = [p for p in HUB_PATTERNS if p != "*.safetensors"]


class HubHeaders(Checkpoint):
    """A hub model known by its config and safetensors headers only (shapes, no weights):
    enough for checks and plans; `fetched()` downloads it."""

    def fetched(self) -> Checkpoint:
        if self.has_weights:  # a repo without safetensors headers: nothing to download
            return self
        return open_hub_model(self.reference, download_weights=True)


def split_hub_id(reference: str) -> tuple[str, Optional[str]]:
    repo, _, revision = reference.partition("@")
    return repo, (revision or None)


def open_hub_model(reference: str, download_weights: bool = True) -> Checkpoint:
    """Resolve `org/name[@revision]` through huggingface_hub: the cache first (works
    offline), then the network, downloading only config, tokenizer and safetensors
    files. Without `download_weights`, only small files are fetched and tensor shapes
    come from the safetensors headers on the hub (enough for checks and plans)."""
    repo, revision = split_hub_id(reference)
    if not current_access().restricted:  # a visitor of a public deployment is checked with the hub first
        folder = hub_snapshot(reference, repo, revision, HUB_PATTERNS, local_only=True)
        if folder is not None and any(folder.glob("*.safetensors")):
            return open_folder(folder, reference)
    if not download_weights:
        folder = hub_snapshot(reference, repo, revision, HUB_SMALL_PATTERNS, local_only=False)
        config = read_config(folder, reference)
        return HubHeaders(reference, folder, config, _hub_tensor_infos(reference, repo, revision))
    folder = hub_snapshot(reference, repo, revision, HUB_PATTERNS, local_only=False)
    return open_folder(folder, reference)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def hub_reachable(endpoint: str, seconds: float = 3.0) -> bool:
    """Whether the hub's host answers a TCP connection (huggingface_hub itself would retry
    for half a minute before saying it cannot)."""
    import socket
    from urllib.parse import urlparse

    parts = urlparse(endpoint)
    try:
        socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                 timeout=seconds).close()
        return True
    except OSError:
        return False


def hub_snapshot(reference: str, repo: str, revision: Optional[str], patterns: list[str],
                  local_only: bool) -> Optional[Path]:
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hub_errors

    if not local_only and hub_offline():
        raise MergeError(f"model '{reference}' is not in the Hugging Face cache and the hub is "
                         "offline (HF_HUB_OFFLINE is set)")
    if current_access().restricted:
        # the cache is shared by every visitor, and huggingface_hub falls back to it when the hub
        # says no: ask the hub first whether this visitor may read the repo
        if local_only:
            return None
        check_hub_read_access(reference, repo, revision)
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns,
                                      local_files_only=local_only, token=hub_token()))
    except (hub_errors.GatedRepoError, hub_errors.RepositoryNotFoundError, hub_errors.RevisionNotFoundError) as error:
        raise hub_refusal(error, repo, revision) from None
    except Exception as error:  # connection errors come in many types
        if local_only:
            return None
        raise MergeError(f"cannot download model '{reference}': the Hugging Face hub is not "
                         f"reachable and the model is not in the cache ({type(error).__name__})") from None


def hub_refusal(error: Exception, repo: str, revision: Optional[str]) -> MergeError:
    """The hub's no, in one line: gated, not there (or not readable with this token), or no
    such revision; how to get in says what this deployment offers (log in, or sign in)."""
    from huggingface_hub import errors as hub_errors

    get_in = "sign in" if current_access().restricted else "log in with hf auth login"
    if isinstance(error, hub_errors.GatedRepoError):
        return MergeError(f"model '{repo}' is gated: accept its terms on the hub and {get_in}")
    if isinstance(error, hub_errors.RevisionNotFoundError):
        return MergeError(f"model '{repo}' has no revision '{revision}'")
    return MergeError(f"no model '{repo}' on the Hugging Face hub that you can read (if it is private, {get_in})")


def check_hub_read_access(reference: str, repo: str, revision: Optional[str]) -> None:
    """Ask the hub, with the current token, whether the repo can be read: a model another
    visitor's token brought into the shared cache is not readable without it
    (huggingface_hub itself falls back to the cache when the hub says no)."""
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hub_errors

    if hub_offline():
        raise MergeError(f"model '{reference}': the hub is offline here (HF_HUB_OFFLINE is set), so "
                         "access to it cannot be checked")
    try:
        HfApi(endpoint=hub_endpoint()).model_info(repo, revision=revision, token=hub_token())
    except (hub_errors.GatedRepoError, hub_errors.RepositoryNotFoundError, hub_errors.RevisionNotFoundError) as error:
        raise hub_refusal(error, repo, revision) from None
    except Exception as error:  # connection errors come in many types
        raise MergeError(f"cannot reach the Hugging Face hub to check model '{reference}' "
                         f"({type(error).__name__})") from None


def _hub_tensor_infos(reference: str, repo: str, revision: Optional[str]) -> dict[str, TensorInfo]:
    from huggingface_hub import get_safetensors_metadata

    try:
        metadata = get_safetensors_metadata(repo, revision=revision, token=hub_token())
    except Exception as error:
        raise MergeError(f"cannot read the safetensors headers of '{reference}' from the hub "
                         f"({type(error).__name__})") from None
    infos = {}
    for file_metadata in metadata.files_metadata.values():
        for name, tensor in file_metadata.tensors.items():
            infos[name] = TensorInfo(name, SAFETENSORS_DTYPES[tensor.dtype], tuple(tensor.shape))
    return infos
