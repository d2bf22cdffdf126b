"""The verifier finds an event's sealed content by position (fast); it must be exactly what
the definition says (the canonical line with the values of prev_hash, seq and ts taken
out), whatever `details` holds: keys named like the top-level ones, quotes, unicode."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charter.audit.chain import canonical_json, event_body
from charter.audit.verify import SealError, sealed_parts

TRICKY_KEYS = st.sampled_from(["prev_hash", "seq", "ts", "target_id", "target_type",
                               "request_id", "details", "action", "a", "é", 'q"uote'])
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12) | \
    st.sampled_from([',"ts":"', ',"seq":1', ',"prev_hash":"' + "a" * 64, '"}', "\\"])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | TEXT,
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(TRICKY_KEYS | TEXT, inner, max_size=3), max_leaves=12)


def reference(line: bytes) -> tuple[bytes, str]:
    """The definition, through a JSON parse."""
    text = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    obj = json.loads(line)
    pre = (f'{{"action":{text(obj["action"])},"actor":{text(obj["actor"])},'
           '"details":').encode()
    post = f',"outcome":{text(obj["outcome"])},"prev_hash":"'.encode()
    mid = f'","request_id":{text(obj["request_id"])},"seq":'.encode()
    tail = (f',"target_id":{text(obj["target_id"])},'
            f'"target_type":{text(obj["target_type"])},"ts":"').encode()
    suffix = (post + obj["prev_hash"].encode() + mid + str(obj["seq"]).encode() + tail
              + obj["ts"].encode() + b'"}')
    assert line.startswith(pre) and line.endswith(suffix)
    return pre + line[len(pre):len(line) - len(suffix)] + post + mid + tail, obj["ts"]


@settings(max_examples=300, deadline=None)
@given(details=st.dictionaries(TRICKY_KEYS | TEXT, JSON, max_size=5),
       actor=TEXT, target_id=TEXT, request_id=st.none() | TEXT,
       seq=st.integers(min_value=1, max_value=2**53 - 1))
def test_by_position_is_the_definition(details, actor, target_id, request_id, seq) -> None:  # type: ignore[no-untyped-def]
    line = canonical_json(event_body(
        seq=seq, ts=datetime(2026, 12, 6, 8, 0, 0, 123456, tzinfo=UTC), actor=actor,
        action="version.approve", target_type="model_version", target_id=target_id,
        outcome="success", details=details, request_id=request_id, prev_hash="ab" * 32))
    assert sealed_parts(line) == reference(line)


@pytest.mark.parametrize("line", [b"", b"{}", b'{"action":"x"}',
                                  b'{"action":"a","ts":"2026"}', b"not json at all"])
def test_what_is_no_event_line_is_refused(line: bytes) -> None:
    with pytest.raises(SealError):
        sealed_parts(line)
