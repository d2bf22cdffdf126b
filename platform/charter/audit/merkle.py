"""Merkle trees as RFC 9162 (Certificate Transparency v2) defines them, section 2.1.

Pure functions over leaf hashes; the hashing and the verification algorithms live in the
standalone verifier (charter.audit.verify), proof building over leaves here.
`leaf_hash(entry)` is HASH(0x00 || entry); a tree head is MTH over the leaf hashes in
order; `inclusion_proof` and `consistency_proof` are the audit paths and consistency
proofs of sections 2.1.3 and 2.1.4.

Proofs here are built from all the leaf hashes in O(n) per proof: the reference that
tests hold the stored tree (charter.audit.tree, O(log n) a proof) against.
"""

from __future__ import annotations

from collections.abc import Sequence

from charter.audit.verify import (
    EMPTY_ROOT,
    ProofError,
    leaf_hash,
    node_hash,
    range_root,
    split,
    verify_consistency,
    verify_inclusion,
    walk_multiproof,
)

__all__ = ["EMPTY_ROOT", "ProofError", "consistency_proof", "inclusion_proof", "leaf_hash",
           "node_hash", "range_root", "root", "split", "verify_consistency",
           "verify_inclusion", "walk_multiproof"]
_split = split


def root(leaves: Sequence[bytes]) -> bytes:
    """MTH(D[n]) of the leaf hashes (not the entries)."""
    return _root(leaves, 0, len(leaves))


def _root(leaves: Sequence[bytes], lo: int, hi: int) -> bytes:
    n = hi - lo
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaves[lo]
    # Iterative over perfect subtrees, left to right, then folded from the right: the
    # same value as the recursive definition, without its depth.
    stack: list[tuple[int, bytes]] = []  # (size, hash) of perfect subtrees
    for i in range(lo, hi):
        size, h = 1, leaves[i]
        while stack and stack[-1][0] == size:
            _, left = stack.pop()
            size, h = size * 2, node_hash(left, h)
        stack.append((size, h))
    h = stack[-1][1]
    for _, left in reversed(stack[:-1]):
        h = node_hash(left, h)
    return h


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """PATH(m, D[n]): the audit path of leaf `index` in the tree of all `leaves`."""
    if not 0 <= index < len(leaves):
        raise ProofError(f"leaf {index} is not in a tree of size {len(leaves)}")
    path: list[bytes] = []
    lo, hi, m = 0, len(leaves), index
    while hi - lo > 1:
        k = _split(hi - lo)
        if m < k:
            path.append(_root(leaves, lo + k, hi))
            hi = lo + k
        else:
            path.append(_root(leaves, lo, lo + k))
            lo, m = lo + k, m - k
    return path[::-1]


def consistency_proof(leaves: Sequence[bytes], first: int) -> list[bytes]:
    """PROOF(m, D[n]): that the tree of the first `first` leaves is a prefix of this one."""
    n = len(leaves)
    if not 0 < first <= n:
        raise ProofError(f"no consistency proof from size {first} to size {n}")
    return _subproof(leaves, first, 0, n, True)


def _subproof(leaves: Sequence[bytes], m: int, lo: int, hi: int, whole: bool) -> list[bytes]:
    n = hi - lo
    if m == n:
        return [] if whole else [_root(leaves, lo, hi)]
    k = _split(n)
    if m <= k:
        return [*_subproof(leaves, m, lo, lo + k, whole), _root(leaves, lo + k, hi)]
    return [*_subproof(leaves, m - k, lo + k, hi, False), _root(leaves, lo, lo + k)]
