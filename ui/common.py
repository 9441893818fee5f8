"""What every panel shares: the GPU marker, readable errors, and reading a recipe box."""

from __future__ import annotations

import gradio as gr

from merging import MergeError, load_config

from .recipe_panel import is_public_deployment, refuse_local_paths

try:  # on a ZeroGPU Space, functions that use the GPU must say so; elsewhere a no-op
    from spaces import GPU as gpu
except ImportError:
    def gpu(function):
        return function


def text_lines(text) -> list[str]:
    """The non-empty lines of a text box, stripped."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def friendly(error: Exception) -> gr.Error:
    """A user's mistake as its own one line; anything else named as unexpected."""
    if isinstance(error, MergeError):
        return gr.Error(str(error))
    return gr.Error(f"unexpected error: {type(error).__name__}: {error}")


def read_recipe(recipe: str, kind: type, wrong_kind: str):
    """The recipe box's config, if it is a `kind` (else `wrong_kind` is the error); on a
    public deployment, local paths outside the demo cache are refused."""
    config = load_config(recipe)
    if not isinstance(config, kind):
        raise MergeError(wrong_kind)
    if is_public_deployment():
        refuse_local_paths(config)
    return config


def user_key(request: gr.Request = None, profile=None) -> str:
    """Whose history this is: the signed-in hub user; else, on a public deployment, this
    browser session only (no one sees another's merges); else the local user."""
    if profile is not None and getattr(profile, "username", None):
        return f"hf:{profile.username}"
    if is_public_deployment():
        return f"session:{request.session_hash if request else 'none'}"
    return "local"


def remember(recipe: str, kind: str, request: gr.Request = None, profile=None, scores=None) -> int:
    """Record a merge in the history; returns its id."""
    from .session import history

    return history().record(user_key(request, profile), recipe, kind, scores)
