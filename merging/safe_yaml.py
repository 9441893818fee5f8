"""Reading YAML that a stranger wrote: its size, nesting and node count are bounded
before any Python object is built from it.

A few hundred bytes of YAML aliases can stand for billions of nodes (each `*a` repeats
a whole subtree), and libyaml's composer recurses once per nesting level in C, so a
deep `[[[[...` crashes the process. The events of the parser arrive one by one with no
recursion, so the checks walk them first: depth, and the node count with every alias
counted at the size of what it repeats.
"""

from __future__ import annotations

import yaml

from .errors import MergeError
from .limits import check

LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: 10x faster
MAX_DEPTH = 64  # recipes nest five or six levels; the C composer crashes at tens of thousands
_OPENS = (yaml.SequenceStartEvent, yaml.MappingStartEvent)
_CLOSES = (yaml.SequenceEndEvent, yaml.MappingEndEvent)


def check_yaml_size(text: str) -> None:
    """Refuse text over the byte limit, nested deeper than MAX_DEPTH, or whose nodes,
    aliases expanded, exceed the node limit; reads events only, builds nothing."""
    from .limits import limit

    check("recipe_bytes", len(text.encode("utf-8", "replace")), f"the recipe is {len(text)} bytes")
    most = limit("yaml_nodes")
    anchors: dict[str, int] = {}
    open_nodes: list[list] = []  # [expanded size so far, anchor] per collection being read
    total = 0
    try:
        for event in yaml.parse(text, Loader=LOADER):
            if isinstance(event, _OPENS):
                if len(open_nodes) >= MAX_DEPTH:
                    raise MergeError(f"the recipe nests deeper than {MAX_DEPTH} levels")
                open_nodes.append([1, event.anchor])
                continue
            if isinstance(event, _CLOSES):
                size, anchor = open_nodes.pop()
            elif isinstance(event, yaml.ScalarEvent):
                size, anchor = 1, event.anchor
            elif isinstance(event, yaml.AliasEvent):
                size, anchor = anchors.get(event.anchor, 1), None
            else:
                continue  # stream and document markers
            if anchor is not None:
                anchors[anchor] = size
            if open_nodes:
                open_nodes[-1][0] += size
            else:
                total += size
            if total + sum(node[0] for node in open_nodes) > most:
                check("yaml_nodes", most + 1, "the recipe's YAML, aliases expanded, has too many nodes")
    except yaml.YAMLError as error:
        raise yaml_error(error) from None


def load_documents(text: str) -> list:
    """The non-empty YAML documents of `text`, after check_yaml_size."""
    check_yaml_size(text)
    try:
        return [d for d in yaml.load_all(text, Loader=LOADER) if d is not None]
    except yaml.YAMLError as error:
        raise yaml_error(error) from None


def yaml_error(error: yaml.YAMLError) -> MergeError:
    mark = getattr(error, "problem_mark", None)
    line = f" at line {mark.line + 1}" if mark else ""
    return MergeError(f"the config is not valid YAML{line}: {getattr(error, 'problem', None) or error}")
