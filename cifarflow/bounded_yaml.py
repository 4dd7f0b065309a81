"""YAML read within bounds: params.yaml is untrusted text that DVC parses too, so it is measured
before anything is built from it: its size, its nesting, and its node count once aliases expand.

Every check is linear in the text, cheapest first: the byte size; then one pass over the parser's
events (libyaml's, when PyYAML has it) that stops as soon as the nesting or the count of nodes is
over its cap, before a node is built; then the composed document, each node visited once (alias
targets are measured once and memoised) with duplicate keys found by a set per mapping; and the
Python values are constructed from those nodes, not from another parse.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cifarflow.errors import ConfigError
from cifarflow.openfile import read_regular
from cifarflow.redact import short

MAX_PARAMS_BYTES = 1 << 20  # params.yaml is a few KB; a MiB is not a settings file
MAX_YAML_NODES = 20_000  # scalars, sequences and mappings after every alias is expanded: params.yaml has ~400
MAX_YAML_DEPTH = 64  # nesting levels: params.yaml needs about 6
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser: the same documents, ~10x faster
NODE_EVENTS = (yaml.ScalarEvent, yaml.AliasEvent, yaml.SequenceStartEvent, yaml.MappingStartEvent)
OPENING, CLOSING = (yaml.SequenceStartEvent, yaml.MappingStartEvent), (yaml.SequenceEndEvent, yaml.MappingEndEvent)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_unique_keys(node: yaml.MappingNode, path: str) -> None:
    """A key twice in one mapping is an error (DVC refuses such a file), at any size of mapping."""
    seen: set[str] = set()
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode):
            continue
        if key.value in seen:
            raise ConfigError(
                f"{path}: line {key.start_mark.line + 1}: key {short(key.value)} appears twice in "
                "one mapping (DVC refuses such a file); keep one"
            )
        seen.add(key.value)


def expanded_size(root: yaml.Node, path: str) -> int:
    """How many nodes `root` becomes once its aliases are expanded, memoised per node (so a "billion
    laughs" document is measured in time linear in its text), iteratively (so deep nesting is an
    error, not a RecursionError); also refuses recursive aliases and duplicate keys."""
    sizes: dict[int, int] = {}
    ancestors: set[int] = set()
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 0, False)]
    while stack:
        node, depth, done = stack.pop()
        if not done and id(node) in sizes:  # an alias's target, measured already
            continue
        children = _children(node)
        if done:
            ancestors.discard(id(node))
            sizes[id(node)] = min(1 + sum(sizes[id(c)] for c in children), MAX_YAML_NODES + 1)
            continue
        if id(node) in ancestors:
            raise ConfigError(f"{path}: a YAML alias refers to a node that contains it (a recursive document)")
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"{path}: line {node.start_mark.line + 1}: nested more than {MAX_YAML_DEPTH} levels deep")
        if isinstance(node, yaml.MappingNode):
            _check_unique_keys(node, path)
        ancestors.add(id(node))
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def prescan(text: str, path: Path | str) -> None:
    """One pass over the parser's events, stopped at the first that breaks a cap: deeper than
    MAX_YAML_DEPTH, or more than MAX_YAML_NODES node events (each becomes at least one node, an alias
    at least its target's), so no document over a cap is ever composed."""
    depth = nodes = 0
    try:
        for event in yaml.parse(text, Loader=LOADER):
            if isinstance(event, NODE_EVENTS):
                nodes += 1
                if nodes > MAX_YAML_NODES:
                    raise ConfigError(
                        f"{path}: more than {MAX_YAML_NODES:,} YAML nodes (a params file has a few hundred); not a params file"
                    )
            if isinstance(event, OPENING):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    line = event.start_mark.line + 1 if event.start_mark else "?"
                    raise ConfigError(f"{path}: line {line}: nested more than {MAX_YAML_DEPTH} levels deep")
            elif isinstance(event, CLOSING):
                depth -= 1
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {short(str(exc), 400)}") from None


def parse_yaml(data: bytes, path: Path | str) -> Any:
    """YAML text already read (at most MAX_PARAMS_BYTES), checked, then constructed from the same parse."""
    if len(data) > MAX_PARAMS_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_PARAMS_BYTES:,} bytes; not a params file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    prescan(text, path)
    try:
        loader = LOADER(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {short(str(exc), 400)}") from None
    try:
        try:
            node = loader.get_single_node()
        except (yaml.YAMLError, RecursionError) as exc:
            raise ConfigError(f"{path}: not valid YAML: {short(str(exc), 400)}") from None
        if node is None:
            return {}
        if expanded_size(node, str(path)) > MAX_YAML_NODES:
            raise ConfigError(
                f"{path}: expands to more than {MAX_YAML_NODES:,} YAML nodes (aliases and anchors "
                "repeating large parts?); write the values out"
            )
        try:
            return loader.construct_document(node)
        except (yaml.YAMLError, ValueError, TypeError) as exc:  # e.g. a timestamp out of range, an unhashable key
            raise ConfigError(f"{path}: not valid YAML: {short(str(exc), 400)}") from None
    finally:
        loader.dispose()


def read_yaml(path: Path | str) -> Any:
    """A YAML file, parsed safely and within bounds: a regular file (a FIFO or device is refused
    unopened), at most MAX_PARAMS_BYTES of text and MAX_YAML_NODES nodes after alias expansion."""
    data = read_regular(
        Path(path),
        MAX_PARAMS_BYTES,
        missing="not found; run from the project root or pass --params",
        what="a YAML file",
        error=ConfigError,
    )
    return parse_yaml(data, path)
