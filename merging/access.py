"""Which local folders and hub repos a merge may read, and with whose hub token.

A local run reads any folder and uses the machine's own hub login. A public deployment
(merging.limits.is_public_deployment) reads local models only inside its allowed folders
(the demo cache, and the visitor's own session folder), treats anything shaped like a hub
id as a hub id, and reads the hub with the visitor's own token (signed in) or with none,
never the server's: a stranger must not merge a private or gated model the owner can read.

    with access_scope(visitor_access(token, session_folder)):
        plan_stages(recipe)       # every open_model inside obeys it

The scope is a context variable, so it holds for the code that runs in the handler's
thread; anything outside a scope (another thread, say) gets the deployment's default,
which on a public deployment is the strict one: no local paths but the demo cache, no token.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

from .errors import MergeError
from .limits import is_public_deployment

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")  # org/name[@revision]
HubToken = Union[str, bool, None]  # a token; False: send none; None: huggingface_hub's own (the machine's login)


@dataclass(frozen=True)
class Access:
    local_roots: Optional[tuple[Path, ...]]  # None: any local path
    hub_token: HubToken = None

    @property
    def restricted(self) -> bool:
        return self.local_roots is not None

    def allows_local(self, path: Union[str, Path]) -> bool:
        if self.local_roots is None:
            return True
        resolved = Path(path).expanduser().resolve()
        return any(resolved.is_relative_to(root) for root in self.local_roots)

    def reads_from_hub(self, reference: str) -> bool:
        """Restricted: True for a hub id (never looked up on the server's disk), False for a
        local path inside the allowed folders, and anything else is refused. Unrestricted:
        False, so the caller looks on disk first, as it always has."""
        if self.local_roots is None:
            return False
        if HUB_ID.match(reference) and not self.allows_local(reference):
            return True
        self.check_local(reference)
        return False

    def check_local(self, reference: str, path: Union[str, Path, None] = None) -> None:
        """Refuse a local path outside the allowed folders (saying the same whether it exists
        or not, so the refusal reveals nothing about the server's files)."""
        if not self.allows_local(path if path is not None else reference):
            raise MergeError(f"model '{reference}': local paths are disabled on a public deployment")


_SCOPE: ContextVar[Optional[Access]] = ContextVar("mergelab_access", default=None)


def default_access() -> Access:
    """Outside any scope: everything locally; the demo cache and no token in public."""
    if is_public_deployment():
        from .demo import default_cache

        return Access((default_cache().resolve(),), False)
    return Access(None, None)


def current_access() -> Access:
    return _SCOPE.get() or default_access()


def visitor_access(token: Optional[str] = None, folders: tuple = ()) -> Access:
    """What one visitor's request may read: locally, everything with the machine's login; on a
    public deployment, the demo cache and `folders` (the visitor's session folder), and the hub
    with `token` (the visitor's own) or none."""
    if not is_public_deployment():
        return Access(None, token or None)
    roots = default_access().local_roots + tuple(Path(f).resolve() for f in folders if f)
    return Access(roots, token or False)


@contextmanager
def access_scope(access: Access) -> Iterator[Access]:
    marker = _SCOPE.set(access)
    try:
        yield access
    finally:
        _SCOPE.reset(marker)


def hub_token() -> HubToken:
    """The token for a hub call made now."""
    return current_access().hub_token
