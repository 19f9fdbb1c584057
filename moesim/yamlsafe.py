"""YAML loading that refuses alias bombs ("billion laughs") in time linear in the input.

PyYAML builds an aliased node once and shares it, so a bomb is cheap to parse and explodes only
later, when the data is copied, validated or dumped. `safe_load` composes the node graph, counts
the nodes the document would have with every alias expanded (each node once, memoised) and refuses
a document whose aliases add more than MAX_ALIAS_NODES nodes, or an alias inside its own anchor."""
from __future__ import annotations

import yaml
from yaml.nodes import MappingNode, SequenceNode

MAX_ALIAS_NODES = 10_000   # nodes that aliases may add beyond those written out in the file


class AliasBombError(yaml.YAMLError):
    """The document's aliases expand beyond MAX_ALIAS_NODES, or an alias refers to itself."""


def _children(node):
    if isinstance(node, SequenceNode):
        return node.value
    if isinstance(node, MappingNode):
        return [n for kv in node.value for n in kv]
    return []


def expanded_size(root) -> tuple[int, int]:
    """(nodes written, nodes with every alias expanded); AliasBombError on a recursive alias.
    Iterative (no recursion limit) and memoised: O(nodes written)."""
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            size[key] = min(1 + sum(size[id(c)] for c in _children(node)), 1 << 62)
            continue
        if key in size:
            continue
        if key in on_path:
            raise AliasBombError("an alias refers to the node that contains it (a recursive document)")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in size)
    return len(size), size[id(root)]


def safe_load(stream):
    """`yaml.safe_load`, refusing documents whose aliases expand too far (AliasBombError)."""
    loader = yaml.SafeLoader(stream)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        written, expanded = expanded_size(node)
        if expanded - written > MAX_ALIAS_NODES:
            raise AliasBombError(f"its aliases expand {written:,} nodes to {expanded:,}: more than "
                                 f"{MAX_ALIAS_NODES:,} extra nodes (an alias bomb?); write the values out")
        return loader.construct_document(node)
    finally:
        loader.dispose()
