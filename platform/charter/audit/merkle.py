"""Merkle trees as RFC 9162 (Certificate Transparency v2) defines them, section 2.1.

Pure functions over leaf hashes, standard library only, so that the standalone bundle
verifier can use this module as it is. `leaf_hash(entry)` is HASH(0x00 || entry); a tree
head is MTH over the leaf hashes in order; `inclusion_proof` / `verify_inclusion` and
`consistency_proof` / `verify_consistency` are the audit paths and consistency proofs of
sections 2.1.3 and 2.1.4, with the verification algorithms given there.

Proofs are built from the leaf hashes in O(n) per proof; a stored tree (issue 7's
checkpoints) will make that O(log n).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()


class ProofError(ValueError):
    """A proof that does not verify, or a request no proof can answer."""


def leaf_hash(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


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


def verify_inclusion(leaf: bytes, index: int, size: int, path: Sequence[bytes],
                     expected_root: bytes) -> None:
    """RFC 9162 2.1.3.2; raises ProofError unless `leaf` is at `index` of the tree."""
    if not 0 <= index < size:
        raise ProofError(f"leaf {index} is not in a tree of size {size}")
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            raise ProofError("the inclusion proof is too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("the inclusion proof is too short")
    if r != expected_root:
        raise ProofError("the inclusion proof does not lead to the tree's root")


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


def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes,
                       path: Sequence[bytes]) -> None:
    """RFC 9162 2.1.4.2; raises ProofError unless the first tree is a prefix of the
    second."""
    if not 0 < first <= second:
        raise ProofError(f"no consistency from size {first} to size {second}")
    if first == second:
        if path:
            raise ProofError("a proof between equal sizes must be empty")
        if first_root != second_root:
            raise ProofError("two trees of the same size with different roots")
        return
    if not path:
        raise ProofError("the consistency proof is empty")
    proof = list(path)
    if first & (first - 1) == 0:  # an exact power of two: its root is a node of the second
        proof.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            raise ProofError("the consistency proof is too long")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("the consistency proof is too short")
    if fr != first_root:
        raise ProofError("the consistency proof does not lead to the first tree's root")
    if sr != second_root:
        raise ProofError("the consistency proof does not lead to the second tree's root")
