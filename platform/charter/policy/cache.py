"""A cache of dispatch verdicts whose correctness follows from how the policy reads time.

A verdict is a pure function of (policy revision, input). Requests repeat: the same
caller, deployment, node, purpose and data class, differing only in `now`. The dispatch
policy reads `now` in exactly one place, `approval_expired` (`now >= expires_at`), so a
verdict computed with `now < expires_at` holds for every `now' < expires_at`, one computed
with `now >= expires_at` holds for every `now' >= expires_at`, and without a valid expiry
the verdict does not depend on `now` at all.

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
        approval = (input_doc.get("version") or {}).get("approval")
        expires = _parse(approval.get("expires_at")) if isinstance(approval, dict) else None
        raw = approval.get("expires_at") if isinstance(approval, dict) else None
        if now is None or (raw is not None and expires is None):
            return  # a time we cannot read the way the policy does: do not cache
        lo = hi = None
        if expires is not None:
            lo, hi = (None, expires) if now < expires else (expires, None)
        with self._lock:
            self._entries[key] = (verdict, lo, hi)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
