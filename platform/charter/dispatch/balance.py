"""Where an admitted request goes: requests in flight per node, and the order of regions
and nodes to try. Pure rules over plain values, beside the counter a Runtime keeps."""

from __future__ import annotations

import random
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar


class Placed(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def region(self) -> str: ...


N = TypeVar("N", bound=Placed)


class Outstanding:
    """Requests in flight per node in this process: routing prefers the least busy node."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def get(self, node_id: str) -> int:
        return self._counts[node_id]

    def acquire(self, node_id: str) -> None:
        with self._lock:
            self._counts[node_id] += 1

    def release(self, node_id: str) -> None:
        with self._lock:
            self._counts[node_id] = max(0, self._counts[node_id] - 1)


def regions_in_order(nodes: Sequence[N], busy: Callable[[str], int],
                     tie: Callable[[], float] | None = random.random,
                     ) -> list[tuple[str, list[N]]]:
    """The candidates' regions, least busy first (by their least busy node), each with its
    nodes least busy first. Ties are broken at random (`tie`; None keeps the order given):
    the counts are this process's own, so between idle nodes every worker would otherwise
    pick the same first one, and sequential traffic would never spread."""
    rank = {n.id: (busy(n.id), tie() if tie is not None else 0.0) for n in nodes}
    regions: dict[str, list[N]] = defaultdict(list)
    for n in nodes:
        regions[n.region].append(n)
    order = sorted(regions, key=lambda r: min(rank[n.id] for n in regions[r]))
    return [(r, sorted(regions[r], key=lambda n: rank[n.id])) for r in order]


def only_regional(violation_codes: Sequence[str], regional: frozenset[str]) -> bool:
    """Whether a denial names only violations that rule out the node's region (so another
    region may still be tried). Which codes those are is policy data
    (policies/data/dispatch.json, `regional_violations`), beside the rules that emit them."""
    return set(violation_codes) <= regional
