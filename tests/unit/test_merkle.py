"""RFC 9162 Merkle trees: the CT test vectors, the RFC's recursive definitions as an oracle
(hypothesis), and proofs that must fail when anything about them is wrong."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charter.audit.merkle import (
    EMPTY_ROOT,
    ProofError,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root,
    verify_consistency,
    verify_inclusion,
)

# The Certificate Transparency test vectors (RFC 6962 hashing, unchanged in RFC 9162).
ENTRIES = [b"", b"\x00", b"\x10", b"\x20\x21", b"\x30\x31", b"\x40\x41\x42\x43",
           b"\x50\x51\x52\x53\x54\x55\x56\x57",
           bytes(range(0x60, 0x70))]
ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


# --- the RFC's definitions, recursive, as written ------------------------------------------

def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def mth(d: list[bytes]) -> bytes:
    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return d[0]
    k = _k(len(d))
    return node_hash(mth(d[:k]), mth(d[k:]))


def path(m: int, d: list[bytes]) -> list[bytes]:
    if len(d) == 1:
        return []
    k = _k(len(d))
    if m < k:
        return [*path(m, d[:k]), mth(d[k:])]
    return [*path(m - k, d[k:]), mth(d[:k])]


def subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    if m == len(d):
        return [] if b else [mth(d)]
    k = _k(len(d))
    if m <= k:
        return [*subproof(m, d[:k], b), mth(d[k:])]
    return [*subproof(m - k, d[k:], False), mth(d[:k])]


def leaves(n: int, salt: int = 0) -> list[bytes]:
    return [leaf_hash(f"event {salt}-{i}".encode()) for i in range(n)]


def flip(b: bytes) -> bytes:
    return bytes([b[0] ^ 1]) + b[1:]


# --- tests ----------------------------------------------------------------------------------

def test_the_ct_test_vectors() -> None:
    hashed = [leaf_hash(e) for e in ENTRIES]
    assert root([]) == EMPTY_ROOT == hashlib.sha256(b"").digest()
    assert [root(hashed[:n]).hex() for n in range(1, 9)] == ROOTS


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 300), st.data())
def test_roots_and_proofs_are_the_rfcs(n: int, data: st.DataObject) -> None:
    d = leaves(n)
    assert root(d) == mth(d)
    m = data.draw(st.integers(0, n - 1))
    assert inclusion_proof(d, m) == path(m, d)
    first = data.draw(st.integers(1, n))
    assert consistency_proof(d, first) == subproof(first, d, True)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 300), st.data())
def test_an_inclusion_proof_verifies_and_nothing_else_does(n: int, data: st.DataObject
                                                           ) -> None:
    d = leaves(n)
    m = data.draw(st.integers(0, n - 1))
    proof, head = inclusion_proof(d, m), root(d)
    verify_inclusion(d[m], m, n, proof, head)
    # (The size only shapes the path: it is bound to the root by the signed checkpoint.)
    wrong: list[tuple[bytes, int, int, list[bytes], bytes]] = [
        (flip(d[m]), m, n, proof, head),  # another event
        (d[m], m, n, proof, flip(head)),  # another tree
        (d[m], m, n, [*proof, head], head),  # too long
    ]
    if n > 1:
        wrong.append((d[m], (m + 1) % n, n, proof, head))  # another place
        wrong.append((d[(m + 1) % n], m, n, proof, head))  # its neighbour's hash
        i = data.draw(st.integers(0, len(proof) - 1))
        wrong.append((d[m], m, n, [*proof[:i], flip(proof[i]), *proof[i + 1:]], head))
        wrong.append((d[m], m, n, proof[:-1], head))  # too short
    for args in wrong:
        with pytest.raises(ProofError):
            verify_inclusion(*args)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 300), st.data())
def test_a_consistency_proof_verifies_and_a_rewritten_history_does_not(
        n: int, data: st.DataObject) -> None:
    d = leaves(n)
    first = data.draw(st.integers(1, n))
    proof = consistency_proof(d, first)
    verify_consistency(first, n, root(d[:first]), root(d), proof)
    # A log that changed an old event: its earlier head cannot be shown a prefix.
    j = data.draw(st.integers(0, first - 1))
    forked = [*d[:j], flip(d[j]), *d[j + 1:]]
    with pytest.raises(ProofError):
        verify_consistency(first, n, root(forked[:first]), root(d), proof)
    with pytest.raises(ProofError):
        verify_consistency(first, n, root(d[:first]), root(forked), proof)
    if proof:
        i = data.draw(st.integers(0, len(proof) - 1))
        with pytest.raises(ProofError):
            verify_consistency(first, n, root(d[:first]), root(d),
                               [*proof[:i], flip(proof[i]), *proof[i + 1:]])
    if first < n:
        with pytest.raises(ProofError):
            verify_consistency(first, n, root(d[:first]), root(d), [])
        with pytest.raises(ProofError):  # the right proof for another size
            verify_consistency(first, n - 1 if n - 1 >= first else n, root(d[:first]),
                               root(d[:n - 1]) if n - 1 >= first else flip(root(d)), proof)


def test_requests_no_proof_can_answer() -> None:
    d = leaves(5)
    with pytest.raises(ProofError):
        inclusion_proof(d, 5)
    with pytest.raises(ProofError):
        consistency_proof(d, 0)
    with pytest.raises(ProofError):
        consistency_proof(d, 6)
    with pytest.raises(ProofError):
        verify_consistency(3, 3, root(d[:3]), flip(root(d[:3])), [])
    verify_consistency(5, 5, root(d), root(d), [])


# --- level-by-level roots and batch inclusion proofs ---------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=300))
def test_the_level_by_level_root_is_the_rfcs_root(n: int) -> None:
    from charter.audit.verify import range_root

    leaves = [leaf_hash(i.to_bytes(4, "big")) for i in range(n)]
    assert range_root(leaves) == mth(leaves)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=70), max_size=8))
def test_the_frontier_in_bulk_is_the_rfcs_root_at_every_size(chunks: list[int]) -> None:
    """The database walk folds whole pages into the tree (Frontier.extend, perfect blocks
    aligned on the size) and holds it against checkpoints of any size between pages."""
    from charter.audit.verify import Frontier

    bulk, one_by_one, leaves = Frontier(), Frontier(), []
    for n in chunks:
        chunk = [leaf_hash(f"{len(leaves) + i}".encode()) for i in range(n)]
        bulk.extend(chunk)
        for leaf in chunk:
            one_by_one.append(leaf)
        leaves += chunk
        assert bulk.size == one_by_one.size == len(leaves)
        assert bulk.root() == one_by_one.root() == mth(leaves)


def _batch_proof(leaves: list[bytes], indices: list[int]) -> list[tuple[int, int, bytes]]:
    from charter.audit.merkle import walk_multiproof

    nodes: list[tuple[int, int, bytes]] = []

    def gap(lo: int, hi: int) -> bytes:
        nodes.append((lo, hi, mth(leaves[lo:hi])))
        return nodes[-1][2]

    walk_multiproof(len(leaves), indices, lambda a, b: mth([leaves[i] for i in indices[a:b]]),
                    gap)
    return nodes


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=1, max_value=200).flatmap(
    lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1), min_size=1))))
def test_a_batch_proof_recomputes_the_root_and_nothing_else(case: tuple[int, set[int]]) -> None:
    from charter.audit.verify import multiproof_root

    n, chosen = case
    leaves = [leaf_hash(i.to_bytes(4, "big")) for i in range(n)]
    indices = sorted(chosen)
    nodes = _batch_proof(leaves, indices)
    known = [leaves[i] for i in indices]
    assert multiproof_root(n, indices, known, nodes) == mth(leaves)
    # No proof node covers a known leaf; each per-leaf audit path is within nodes + leaves.
    assert all(not any(lo <= i < hi for i in indices) for lo, hi, _ in nodes)
    if nodes:
        lo, hi, h = nodes[0]
        forged = [(lo, hi, hashlib.sha256(h).digest()), *nodes[1:]]
        assert multiproof_root(n, indices, known, forged) != mth(leaves)
        with pytest.raises(ProofError):
            multiproof_root(n, indices, known, nodes[1:])
        with pytest.raises(ProofError):
            multiproof_root(n, indices, known, [*nodes, nodes[0]])
    changed = [hashlib.sha256(known[0]).digest(), *known[1:]]
    assert multiproof_root(n, indices, changed, nodes) != mth(leaves)
