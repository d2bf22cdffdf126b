"""The audit log's Merkle tree, kept in the database: roots, inclusion, consistency and batch
inclusion proofs in O(log n) reads.

Leaf i of the tree is HASH(0x00 || the 32-byte hash of event i + 1) (RFC 9162 hashing; the
event hash is SHA-256 of the event's canonical bytes), so the tree needs nothing but the
`hash` column, which a purged event's tombstone keeps. Perfect subtrees of 2**TILE_LEVEL
leaves and above are stored in `audit_tree_nodes` as the log grows (`extend`); anything
smaller is hashed from the events of one tile (256 leaves, read once a tile and kept for
the life of the Tree).

Every node of an RFC 9162 tree is either a perfect aligned subtree or lies on the tree's
right edge, which splits into perfect ones: so a root costs O(log n) stored reads and a
proof O(log n) more.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from sqlalchemy import Connection, select, tuple_, union_all
from sqlalchemy.dialects import postgresql, sqlite

from charter.audit.models import AuditEvent, AuditPurged, AuditTreeNode
from charter.audit.verify import (
    EMPTY_ROOT,
    ProofError,
    node_hash,
    range_root,
    split,
    walk_multiproof,
)
from charter.db import table_of

TILE_LEVEL = 8
TILE = 1 << TILE_LEVEL
_EXTEND_CHUNK = 64  # tiles read a query while extending


class TreeError(RuntimeError):
    """The events the tree is built from are not what they must be (a gap, a bad hash).
    `first_bad_seq`: the first event missing or malformed, when known."""

    def __init__(self, message: str, first_bad_seq: int | None = None) -> None:
        super().__init__(message)
        self.first_bad_seq = first_bad_seq

    def details(self, **extra: object) -> dict[str, object]:
        """The integrity alarm's details: `missing` and the seq when one is known."""
        if self.first_bad_seq is None:
            return {"reason": "tree", **extra}
        return {"reason": "missing", "first_bad_seq": self.first_bad_seq, **extra}


class Tree:
    """The tree over one connection (the caller's transaction)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._tiles: dict[int, list[bytes]] = {}  # complete tiles' leaf hashes
        self._stored: dict[tuple[int, int], bytes] = {}
        self._head = 0

    # --- leaves and stored nodes --------------------------------------------------------

    def _read_leaves(self, lo: int, hi: int) -> list[bytes]:
        """Leaf hashes of leaves [lo, hi) (events lo + 1 .. hi)."""
        t, p = table_of(AuditEvent), table_of(AuditPurged)
        rows = self.conn.execute(union_all(
            select(t.c.seq, t.c.hash).where(t.c.seq > lo, t.c.seq <= hi),
            select(p.c.seq, p.c.hash).where(p.c.seq > lo, p.c.seq <= hi),
        ).order_by("seq")).all()
        if len(rows) != hi - lo or (rows and (rows[0][0] != lo + 1 or rows[-1][0] != hi)):
            gap = next((lo + 1 + i for i, (seq, _) in enumerate(rows) if seq != lo + 1 + i),
                       lo + 1 + len(rows))
            raise TreeError(f"event {gap} is missing from the log (events {lo + 1}..{hi} "
                            "are not all there)", gap)
        try:
            return [_leaf(bytes.fromhex(h)) for _, h in rows]
        except ValueError:
            bad = next(seq for seq, h in rows if not _is_hash(h))
            raise TreeError(f"event {bad} has a malformed hash", bad) from None

    def leaves(self, lo: int, hi: int) -> list[bytes]:
        """Leaf hashes [lo, hi); whole tiles are read once and kept."""
        out: list[bytes] = []
        while lo < hi:
            tile = lo // TILE
            start = tile * TILE
            end = min(hi, start + TILE)
            whole = self._tiles.get(tile)
            if whole is None and (end - lo == TILE or self._complete(tile)):
                whole = self._tiles[tile] = self._read_leaves(start, start + TILE)
            out.extend(whole[lo - start:end - start] if whole is not None
                       else self._read_leaves(lo, end))  # the log's tail: only what is asked
            lo = end
        return out

    def _complete(self, tile: int) -> bool:
        """Whether the log holds every event of the tile (once true, true for good)."""
        need = (tile + 1) * TILE
        if self._head < need:
            t = table_of(AuditEvent)
            self._head = self.conn.execute(
                select(t.c.seq).order_by(t.c.seq.desc()).limit(1)).scalar() or 0
        return self._head >= need

    def _stored_node(self, level: int, idx: int) -> bytes | None:
        key = (level, idx)
        if key not in self._stored:
            t = table_of(AuditTreeNode)
            found = self.conn.execute(select(t.c.hash).where(
                t.c.level == level, t.c.idx == idx)).scalar()
            if found is None:
                return None
            self._stored[key] = bytes(found)
        return self._stored[key]

    def stored_leaves(self) -> int:
        """How many leaves the stored tiles cover (always a prefix)."""
        t = table_of(AuditTreeNode)
        top = self.conn.execute(select(t.c.idx).where(t.c.level == TILE_LEVEL)
                                .order_by(t.c.idx.desc()).limit(1)).scalar()
        return 0 if top is None else (top + 1) * TILE

    def extend(self, size: int) -> int:
        """Store every perfect subtree of TILE leaves or more within the first `size`
        leaves; returns how many nodes were added."""
        have = self.stored_leaves() // TILE
        want = size // TILE
        added: list[dict[str, object]] = []
        tile = have
        while tile < want:
            last = min(want, tile + _EXTEND_CHUNK)
            leaves = self._read_leaves(tile * TILE, last * TILE)
            for i in range(tile, last):
                h = range_root(leaves[(i - tile) * TILE:(i - tile + 1) * TILE])
                level, idx = TILE_LEVEL, i
                added.append({"level": level, "idx": idx, "hash": h})
                self._stored[(level, idx)] = h
                while idx & 1:  # a right child completes its parent
                    left = self._stored_node(level, idx - 1)
                    assert left is not None, "stored tiles are a prefix"
                    h = node_hash(left, h)
                    level, idx = level + 1, idx >> 1
                    added.append({"level": level, "idx": idx, "hash": h})
                    self._stored[(level, idx)] = h
            tile = last
        if added:
            table = table_of(AuditTreeNode)
            dialect = self.conn.dialect.name
            stmt = (postgresql.insert(table) if dialect == "postgresql"
                    else sqlite.insert(table)).on_conflict_do_nothing()
            self.conn.execute(stmt, added)
        return len(added)

    # --- nodes, roots and proofs --------------------------------------------------------

    def node(self, lo: int, hi: int) -> bytes:
        """MTH of leaves [lo, hi) as a node of an RFC 9162 tree (perfect and aligned, or
        on a tree's right edge)."""
        n = hi - lo
        if n <= 0:
            return EMPTY_ROOT
        if n & (n - 1) == 0 and lo % n == 0:
            if n >= TILE:
                stored = self._stored_node(n.bit_length() - 1, lo // n)
                if stored is not None:
                    return stored
            else:
                return range_root(self.leaves(lo, hi))
        if n <= TILE:
            return range_root(self.leaves(lo, hi))
        k = split(n)
        return node_hash(self.node(lo, lo + k), self.node(lo + k, hi))

    def _coords(self, lo: int, hi: int, out: list[tuple[int, int]]) -> None:
        """The stored nodes node(lo, hi) would look up (its recursion, without hashing)."""
        n = hi - lo
        if n <= TILE:
            return
        if n & (n - 1) == 0 and lo % n == 0:
            out.append((n.bit_length() - 1, lo // n))
            return
        k = split(n)
        self._coords(lo, lo + k, out)
        self._coords(lo + k, hi, out)

    def prefetch(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Read the stored nodes that these node() calls need in one query."""
        wanted: list[tuple[int, int]] = []
        for lo, hi in ranges:
            self._coords(lo, hi, wanted)
        wanted = [c for c in dict.fromkeys(wanted) if c not in self._stored]
        if not wanted:
            return
        t = table_of(AuditTreeNode)
        rows = self.conn.execute(select(t.c.level, t.c.idx, t.c.hash).where(
            tuple_(t.c.level, t.c.idx).in_(wanted))).all()
        for level, idx, h in rows:
            self._stored[(level, idx)] = bytes(h)

    def root(self, size: int) -> bytes:
        self.prefetch([(0, size)])
        return self.node(0, size)

    def inclusion(self, index: int, size: int) -> list[bytes]:
        """PATH(index, D[size]), leaf to root."""
        if not 0 <= index < size:
            raise ProofError(f"leaf {index} is not in a tree of size {size}")
        siblings: list[tuple[int, int]] = []
        lo, hi = 0, size
        while hi - lo > 1:
            k = split(hi - lo)
            if index < lo + k:
                siblings.append((lo + k, hi))
                hi = lo + k
            else:
                siblings.append((lo, lo + k))
                lo = lo + k
        self.prefetch(siblings)
        return [self.node(a, b) for a, b in reversed(siblings)]

    def consistency(self, first: int, second: int) -> list[bytes]:
        """PROOF(first, D[second])."""
        if not 0 < first <= second:
            raise ProofError(f"no consistency proof from size {first} to size {second}")
        return self._subproof(first, 0, second, True)

    def _subproof(self, m: int, lo: int, hi: int, whole: bool) -> list[bytes]:
        n = hi - lo
        if m == n:
            return [] if whole else [self.node(lo, hi)]
        k = split(n)
        if m <= k:
            return [*self._subproof(m, lo, lo + k, whole), self.node(lo + k, hi)]
        return [*self._subproof(m - k, lo + k, hi, False), self.node(lo, lo + k)]

    def batch_proof(self, size: int, indices: Sequence[int],
                    expected_root: bytes) -> list[tuple[int, int, bytes]]:
        """The nodes that, with the leaves at `indices` (sorted), recompute the root of the
        tree of `size`: checked against `expected_root` before it is handed out."""
        nodes: list[tuple[int, int, bytes]] = []

        def gap(lo: int, hi: int) -> bytes:
            h = self.node(lo, hi)
            nodes.append((lo, hi, h))
            return h

        def known(a: int, b: int) -> bytes:
            return self.node(indices[a], indices[b - 1] + 1)

        if walk_multiproof(size, indices, known, gap) != expected_root:
            raise TreeError(f"the stored tree does not lead to the root signed at size {size}")
        return nodes


def _is_hash(text: str) -> bool:
    try:
        return len(bytes.fromhex(text)) == 32
    except (ValueError, TypeError):
        return False


def _leaf(event_hash: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + event_hash).digest()
