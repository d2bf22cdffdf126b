"""The shared decision cases: a base input per policy and JSON-patch variations of it."""

from __future__ import annotations

import copy
from typing import Any


def apply_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """The replace/remove subset of RFC 6902 that the case files use."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = op["path"].split("/")[1:]
        target = doc
        for p in parents:
            target = target[int(p)] if isinstance(target, list) else target[p]
        key: Any = int(last) if isinstance(target, list) else last
        if op["op"] == "remove":
            del target[key]
        else:
            target[key] = op["value"]
    return doc
