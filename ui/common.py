"""What every panel shares: the handler wrapper (the visitor's access, readable errors), the
GPU marker, reading a recipe box, the heavy-work queue, and the history."""

from __future__ import annotations

import functools
import inspect
import os
import sys
import time
from typing import Optional

import gradio as gr

from merging import MergeError
from merging.access import access_scope, visitor_access
from merging.config import recipe_from_text
from merging.limits import is_public_deployment, limit

from .session import SESSIONS

try:  # on a ZeroGPU Space, functions that use the GPU must say so; elsewhere a no-op
    from spaces import GPU as gpu
except ImportError:
    def gpu(function):
        return function

HEAVY = "heavy"  # the concurrency id every heavy event shares: one queue, server-wide


def heavy_queue() -> dict:
    """Event options that put merge, save, publish, MoE build and sweep into one server-wide
    queue; Gradio shows each visitor their place in it."""
    return {"concurrency_id": HEAVY, "concurrency_limit": limit("heavy_workers")}


def text_lines(text) -> list[str]:
    """The non-empty lines of a text box, stripped."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def debugging() -> bool:
    """MERGELAB_DEBUG=1: a user's mistake prints its traceback on the console too."""
    return os.environ.get("MERGELAB_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def log_mistake(where: str, message: str) -> None:
    """One console line per user mistake (a traceback only with MERGELAB_DEBUG=1)."""
    print(f"MergeLab: {where}: {message.splitlines()[0] if message else ''}", file=sys.stderr, flush=True)


def friendly(error: Exception, where: str = "request") -> gr.Error:
    """A user's mistake as its own one line, logged as one console line (Gradio prints no
    traceback for it unless MERGELAB_DEBUG is set); anything else named as unexpected, with
    its traceback on the console."""
    if isinstance(error, gr.Error):
        if not error.print_exception:
            return error
        mistake = gr.Error(error.message, duration=error.duration, visible=error.visible, title=error.title,
                           print_exception=debugging())
    elif isinstance(error, MergeError):
        mistake = gr.Error(str(error), print_exception=debugging())
    else:
        return gr.Error(f"unexpected error: {type(error).__name__}: {str(error)[:300]}")
    log_mistake(where, mistake.message)
    return mistake


def visitor_token(request) -> Optional[str]:
    """The signed-in visitor's own hub token (Sign in with Hugging Face), if any; Gradio keeps
    it in the request's cookie session."""
    underlying = getattr(request, "request", None) or request
    scope = getattr(underlying, "scope", None)
    session = scope.get("session", {}) if isinstance(scope, dict) else getattr(underlying, "session", None) or {}
    info = session.get("oauth_info") if hasattr(session, "get") else None
    if not info or (info.get("expires_at") or float("inf")) < time.time():
        return None
    return info.get("access_token")


def request_access(request):
    """What this request may read: on a public deployment the demo cache and the visitor's own
    session folder, and the hub with the visitor's token or none."""
    folder = SESSIONS.folder_for(getattr(request, "session_hash", None)) if is_public_deployment() else None
    return visitor_access(visitor_token(request), (folder,) if folder else ())


def handler(function):
    """Wrap an event handler: it runs in the visitor's access scope (see merging.access), and
    any error reaches the page as one readable line. Generator handlers get the scope around
    every step, since Gradio may run each step in another worker thread."""
    signature = inspect.signature(function)

    def access_for(args, kwargs):
        request = signature.bind_partial(*args, **kwargs).arguments.get("request")
        return request_access(request)

    if inspect.isgeneratorfunction(function):
        @functools.wraps(function)
        def stepwise(*args, **kwargs):
            access = access_for(args, kwargs)
            steps = function(*args, **kwargs)
            try:
                while True:
                    with access_scope(access):
                        try:
                            item = next(steps)
                        except StopIteration:
                            return
                        except Exception as error:
                            raise friendly(error, function.__name__) from None
                    yield item
            finally:
                steps.close()  # a cancelled request ends the handler's work now
        return stepwise

    @functools.wraps(function)
    def once(*args, **kwargs):
        with access_scope(access_for(args, kwargs)):
            try:
                return function(*args, **kwargs)
            except Exception as error:
                raise friendly(error, function.__name__) from None
    return once


def in_status(function, outputs: int = 1):
    """A `handler`-wrapped function for a page's own event: a user's mistake comes back as a
    message in the last of the event's `outputs` (a status Markdown under the controls) and
    the other outputs stay as they are, instead of a gr.Error that lays an Error box over the
    outputs (the recipe editor, the merge status). API endpoints keep `handler`'s failures."""

    def message(error: gr.Error):
        text = f"**Error:** {error.message}"
        return (*[gr.skip()] * (outputs - 1), text) if outputs > 1 else text

    if inspect.isgeneratorfunction(function):
        @functools.wraps(function)
        def stepwise(*args, **kwargs):
            steps = function(*args, **kwargs)
            try:
                yield from steps
            except gr.Error as error:
                yield message(error)
            finally:
                steps.close()
        return stepwise

    @functools.wraps(function)
    def once(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except gr.Error as error:
            return message(error)
    return once


def session_hash(request) -> Optional[str]:
    return getattr(request, "session_hash", None)


def read_recipe(recipe: str, kind: type, wrong_kind: str):
    """The recipe box's config (text only: never a path to open), if it is a `kind` (else
    `wrong_kind` is the error)."""
    config = recipe_from_text(recipe or "")
    if not isinstance(config, kind):
        raise MergeError(wrong_kind)
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


def in_page(trigger, function, inputs, outputs, status=None, **options):
    """Wire a `handler`-wrapped function to `trigger` for the page: a mistake comes back as a
    message (see in_status) in `status` (a Markdown under the control, cleared when the call
    succeeds) or, without one, in the last output. Returns the event."""
    outputs_list = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    if status is not None:
        several = len(outputs_list) > 1

        @functools.wraps(function)
        def clearing_status(*args, **kwargs):
            result = function(*args, **kwargs)
            return (*result, "") if several else (result, "")
        outputs_list = outputs_list + [status]
    return trigger(in_status(clearing_status if status is not None else function, len(outputs_list)), inputs=inputs,
                   outputs=outputs_list if len(outputs_list) > 1 else outputs_list[0], **options)


def page_and_api(trigger, function, inputs, outputs, api_name: str, status=None, **options):
    """`in_page` (endpoint `<api_name>_in_page`, undocumented), and the API endpoint
    `api_name` on a hidden twin button, which fails as before (a client gets an error, not a
    message to read). Returns the page's event."""
    event = in_page(trigger, function, inputs, outputs, status, api_name=f"{api_name}_in_page",
                    api_visibility="undocumented", **options)
    gr.Button(visible=False).click(function, inputs=inputs, outputs=outputs, api_name=api_name, **options)
    return event
