"""A cache of dispatch verdicts whose correctness follows from how the policy reads time.

A verdict is a pure function of (policy revision, input). Requests repeat: the same
caller, deployment, node, purpose and data class, differing only in `now`. The dispatch
policy reads `now` only against expiries (`approval_expired`: the version's own,
`base_approval_expired`: each ancestor's in `version.lineage`), so a verdict holds for
every `now'` with no expiry between `now` and `now'`: the interval between the nearest
expiries around `now`; without a valid expiry the verdict does not depend on `now` at all.

So the key is (revision, SHA-256 of the canonical input without `now`) and an entry stores
the interval of `now` on which it holds; a lookup checks the request's own `now` against
it (so playground inputs with any `now` are answered correctly too). Anything else the
verdict depends on (version state, approval conditions, entitlements, node region and
attestation) is in the input, so a change there is a different key; a policy or data
change is a different revision. A test
compares cached and uncached verdicts over every shared case at times around the expiry.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

from charter.audit.chain import canonical_json
from charter.identifiers import EPOCH_MAX
from charter.policy.engine import Verdict

TIME_DEPENDENT = {"dispatch"}  # policies whose only clock read is the approval expiry


def _parse(value: Any) -> int | None:
    """A time as the contract admits it (epoch seconds, charter.identifiers), else None."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= EPOCH_MAX:
        return None
    return value


def _expiries(input_doc: dict[str, Any]) -> list[int] | None:
    """Every time the dispatch policy compares `now` with: the approval's expiry and each
    ancestor's; None when one of them is not a time the policy reads as this does."""
    version = input_doc.get("version")
    version = version if isinstance(version, dict) else {}
    approval = version.get("approval")
    holders = [approval] if isinstance(approval, dict) else []
    lineage = version.get("lineage")
    holders += [a for a in lineage if isinstance(a, dict)] if isinstance(lineage, list) else []
    out = []
    for holder in holders:
        raw = holder.get("expires_at")
        if raw is None:
            continue
        parsed = _parse(raw)
        if parsed is None:
            return None
        out.append(parsed)
    return out


class VerdictCache:
    def __init__(self, max_entries: int = 10_000) -> None:
        self.max_entries = max_entries
        # key -> (verdict, lo, hi): holds for lo <= now < hi (None: unbounded)
        self._entries: OrderedDict[
            str, tuple[Verdict, int | None, int | None]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(revision: str, policy: str, input_doc: dict[str, Any]) -> str | None:
        if policy not in TIME_DEPENDENT or _parse(input_doc.get("now")) is None:
            return None
        rest = {k: v for k, v in input_doc.items() if k != "now"}
        digest = hashlib.sha256(canonical_json(rest)).hexdigest()
        return f"{revision}:{policy}:{digest}"

    def get(self, key: str, input_doc: dict[str, Any]) -> Verdict | None:
        now = _parse(input_doc.get("now"))
        with self._lock:
            entry = self._entries.get(key)
            if (entry is None or now is None or (entry[1] is not None and now < entry[1])
                    or (entry[2] is not None and now >= entry[2])):
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: str, input_doc: dict[str, Any], verdict: Verdict) -> None:
        now = _parse(input_doc.get("now"))
        expiries = _expiries(input_doc)
        if now is None or expiries is None:
            return  # a time we cannot read the way the policy does: do not cache
        lo = max((e for e in expiries if e <= now), default=None)
        hi = min((e for e in expiries if e > now), default=None)
        with self._lock:
            self._entries[key] = (verdict, lo, hi)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
