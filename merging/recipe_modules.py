"""The parts of a multimodal model a `modules:` recipe names, in mergekit's words.

mergekit splits a model into modules, each merged by its own models or slices:
`text_decoder` (the text stack with the input embeddings, final norm and output head),
`vision_tower` / `audio_tower` (that stack with its embeddings and norms), and
`multi_modal_projector` (what joins a tower to the text decoder). Here the parts come from
the architecture model (`Layout`): a tower is one of its stacks, and the projector is what
sits in no stack's submodule, or in a tower's submodule under a name that says so (Qwen2-VL
keeps its `merger` inside `visual`; mergekit calls it the projector).
"""

from __future__ import annotations

from typing import Optional

from . import architecture as arch

TEXT_DECODER = arch.TEXT_ROLE
SINGLE = "default"  # mergekit's name for the one module of a text-only model
PROJECTOR = "multi_modal_projector"
PROJECTOR_WORDS = ("merger", "projector")  # a submodule of a tower that is mergekit's projector


def module_of(layout: "arch.Layout", name: str) -> str:
    """The module a stored tensor belongs to: text_decoder, a tower's role, or the projector."""
    parts = layout.split(name)
    if parts is not None:
        return parts.stack.role
    stack = layout.stack_of(name)
    if stack is None:
        return PROJECTOR
    if stack.role != TEXT_DECODER and _names_projector(layout, name, stack):
        return PROJECTOR
    return stack.role


def _names_projector(layout: "arch.Layout", name: str, stack: "arch.Stack") -> bool:
    module = layout.module_names.get(name, name)
    inside = module[len(stack.root) + 1:] if stack.root and module.startswith(stack.root + ".") else module
    return any(word in part for part in inside.split(".")[:-1] for word in PROJECTOR_WORDS)


def modules_of(layout: "arch.Layout", names) -> dict[str, Optional["arch.Stack"]]:
    """Every module of a checkpoint whose tensors are `names`, with its stack (None for the
    projector): the text decoder first, then the towers, then the projector."""
    found = {module_of(layout, name) for name in names}
    modules: dict[str, Optional[arch.Stack]] = {s.role: s for s in layout.stacks if s.role in found}
    if PROJECTOR in found:
        modules[PROJECTOR] = None
    return modules


def module_specs(modules: dict, available) -> dict:
    """A recipe's `modules` by the names `modules_of` gives (a text-only model's one module
    may be called mergekit's 'default' as well as text_decoder)."""
    if list(available) == [TEXT_DECODER] and SINGLE in modules and TEXT_DECODER not in modules:
        return {TEXT_DECODER: modules[SINGLE], **{k: v for k, v in modules.items() if k != SINGLE}}
    return dict(modules)


def stack_named(layout: "arch.Layout", role: str) -> Optional["arch.Stack"]:
    """This layout's stack of `role` (another checkpoint's Stack may differ in its keys)."""
    return next((s for s in layout.stacks if s.role == role), None)
