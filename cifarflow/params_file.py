"""Edits of params.yaml that keep it as the user wrote it: comments, order, layout (round-trip YAML).

The project edits params.yaml in a few places (the flow's --profile/--archs, verify-repro's
clones, tests); every edit goes through here, is written atomically, and changes only the keys asked.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedSeq

from cifarflow.bounded_yaml import read_yaml
from cifarflow.fileio import write_bytes_atomic


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap a long line
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return yaml


def _like(old: Any, value: Any) -> Any:
    """`value` written in `old`'s style: a list replacing a flow-style list (`[a, b]`) stays one."""
    if isinstance(value, list) and isinstance(old, CommentedSeq) and old.fa.flow_style():
        seq = CommentedSeq(value)
        seq.fa.set_flow_style()
        return seq
    return value


def set_keys(path: Path, changes: dict[str, Any], check: Callable[[Any], Any] | None = None) -> bool:
    """Set dotted keys (`profiles.smoke.data.source`) in the YAML file at `path`, creating missing
    mappings; returns whether anything changed (the file is rewritten only then). `check` is called
    with the edited document (plain data) first: when it raises, the file is left as it was."""
    path = Path(path)
    read_yaml(path)  # bounded parse first: a hostile document never reaches the round-trip loader
    yaml = _yaml()
    document = yaml.load(path.read_text())
    changed = False
    for dotted, value in changes.items():
        node = document
        *parents, leaf = dotted.split(".")
        for key in parents:
            if key not in node or node[key] is None:
                node[key] = {}
                changed = True
            node = node[key]
        if node.get(leaf, object()) != value:
            node[leaf] = _like(node.get(leaf), value)
            changed = True
    if changed:
        buffer = io.StringIO()
        yaml.dump(document, buffer)
        if check is not None:
            check(YAML(typ="safe", pure=True).load(buffer.getvalue()))
        write_bytes_atomic(path, buffer.getvalue().encode())
    return changed
