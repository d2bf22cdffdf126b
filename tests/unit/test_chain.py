"""Canonical JSON and chain verification, without a database."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from charter.audit.chain import (
    GENESIS_HASH,
    ChainRow,
    canonical_json,
    event_body,
    event_hash,
    event_hash_with,
    verify_rows,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_canonical_json_is_rfc8785(value) -> None:  # type: ignore[no-untyped-def]
    try:
        expected = rfc8785.dumps(value)
    except Exception:  # noqa: BLE001 - e.g. lone surrogates: both must refuse
        try:
            canonical_json(value)
        except Exception:  # noqa: BLE001
            return
        raise AssertionError("canonical_json accepted what RFC 8785 refuses") from None
    assert canonical_json(value) == expected


@settings(max_examples=3000, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False)
       | st.floats(min_value=1e-5, max_value=1e17).map(lambda f: round(f, 3))
       | st.integers(-(10**18), 10**18).map(lambda i: i / 1000))
def test_floats_canonicalise_like_rfc8785(value: float) -> None:
    doc = {"duration_ms": value, "nested": [value, -value]}
    assert canonical_json(doc) == rfc8785.dumps(doc)


@settings(max_examples=500, deadline=None)
@given(st.text(), st.text(), st.text(), st.text(), st.text() | st.none(),
       st.integers(1, 2**53 - 1), json_values.filter(lambda v: isinstance(v, dict))
       | st.dictionaries(st.text(max_size=8), json_values, max_size=5))
def test_event_hash_with_canonical_details_is_event_hash(actor, action, target_id, outcome,
                                                         request_id, seq, details) -> None:  # type: ignore[no-untyped-def]
    try:
        details_json = canonical_json(details)
    except Exception:  # noqa: BLE001 - not JSON that RFC 8785 accepts: nothing to compare
        return
    ts = datetime(2026, 12, 1, 12, 30, 5, 123456, tzinfo=UTC)
    fields = {"seq": seq, "ts": ts, "actor": actor, "action": action, "target_type": "t\n",
              "target_id": target_id, "outcome": outcome, "request_id": request_id,
              "prev_hash": GENESIS_HASH}
    try:
        expected = event_hash(event_body(**fields, details=details))
    except Exception:  # noqa: BLE001 - e.g. lone surrogates in a field: both must refuse
        with pytest.raises(Exception):  # noqa: B017, PT011
            event_hash_with(**fields, details_json=details_json)
        return
    assert event_hash_with(**fields, details_json=details_json) == expected


def test_key_order_is_utf16_not_code_points() -> None:
    value = {"\ue000": 1, "\U0001f600": 2}  # code points and UTF-16 units disagree here
    assert canonical_json(value) == rfc8785.dumps(value)
    assert canonical_json(value).index("😀".encode()) < canonical_json(value).index(
        "\ue000".encode())


def _chain(n: int) -> list[ChainRow]:
    rows, prev = [], GENESIS_HASH
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    for seq in range(1, n + 1):
        body = event_body(seq=seq, ts=t0 + timedelta(seconds=seq), actor="user:a", action="x",
                          target_type="t", target_id=str(seq), outcome="success",
                          details={"n": seq}, request_id=None, prev_hash=prev)
        h = event_hash(body)
        rows.append(ChainRow(seq, t0 + timedelta(seconds=seq), "user:a", "x", "t", str(seq),
                             "success", {"n": seq}, None, prev, h))
        prev = h
    return rows


def test_verify_good_chain() -> None:
    rows = _chain(10)
    v = verify_rows(rows)
    assert v.ok and v.count == 10 and v.head_hash == rows[-1].hash


def test_verify_names_first_bad_event() -> None:
    rows = _chain(10)
    edited = rows[:4] + [dataclasses.replace(rows[4], details={"n": 0})] + rows[5:]
    v = verify_rows(edited)
    assert (v.ok, v.first_bad_seq, v.reason, v.count) == (False, 5, "edited", 4)
    v = verify_rows(rows[:3] + rows[4:])
    assert (v.first_bad_seq, v.reason) == (4, "missing")
    assert verify_rows([]).ok and verify_rows([]).head_hash == GENESIS_HASH


def test_format_ts_refuses_naive_datetimes() -> None:
    import pytest

    from charter.audit.chain import format_ts

    with pytest.raises(ValueError):
        format_ts(datetime(2026, 1, 1))
    assert format_ts(datetime(2026, 1, 1, 1, 2, 3, 4, tzinfo=UTC)) == "2026-01-01T01:02:03.000004Z"
