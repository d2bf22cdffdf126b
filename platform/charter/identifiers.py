"""The values policy compares, in one canonical form decided here, before any engine.

Go (OPA) and Rust (regorus) disagree outside ASCII: they map case differently (a capital I
with a dot, a final sigma), and parse times and large numbers differently. So no policy
lowercases, parses or rounds; Charter hands it values that need none of that:

- **Identifiers** (license ids, regions, data classes, purposes, team names): ASCII letters,
  digits and `.` `_` `+` `-`, a letter or digit first, at most 100 characters, in lower
  case. Upper-case ASCII is folded to lower case; anything else is refused where it enters
  (the API's 422, the gateway's 400), never guessed at.
- **Times**: whole seconds since 1970-01-01T00:00:00Z, an integer from 0 to
  253402300799 (9999-12-31T23:59:59Z, the last second Python's datetime holds). Leap
  seconds do not exist in this count (as in POSIX time); fractions are dropped, so an
  expiry at 12:00:00.9 counts from 12:00:00: an approval never outlives its stated time.
- **Numbers**: exact integers within +-(2^53 - 1), which every engine holds exactly.
"""

from __future__ import annotations

import calendar
import re
from datetime import UTC, datetime
from typing import Any

IDENTIFIER_PATTERN = r"^[a-z0-9][a-z0-9._+-]{0,99}$"
_IDENTIFIER = re.compile(r"[a-z0-9][a-z0-9._+-]{0,99}")
EPOCH_MAX = 253_402_300_799  # 9999-12-31T23:59:59Z
INT_MAX = 2**53 - 1


def canonical(value: object) -> str | None:
    """The canonical form of an identifier, or None if it has none."""
    if not isinstance(value, str) or not value.isascii():
        return None
    lowered = value.lower()
    return lowered if _IDENTIFIER.fullmatch(lowered) else None


def identifier(value: str) -> str:
    """A validator: the canonical form, or ValueError saying what an identifier is."""
    found = canonical(value)
    if found is None:
        raise ValueError("must be an identifier: ASCII letters, digits, '.', '_', '+' or "
                         "'-', a letter or digit first, at most 100 characters")
    return found


def stored(value: Any) -> Any:
    """A stored value on its way into a policy input: canonical if it can be (rows written
    before the rule), else unchanged, so the input contract refuses it by name."""
    if isinstance(value, list):
        return [stored(v) for v in value]
    return canonical(value) or value


def epoch(moment: datetime) -> int:
    """A time as policy reads it: whole seconds since the epoch, UTC (naive means UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return calendar.timegm(moment.astimezone(UTC).timetuple())


def utc_text(moment: datetime) -> str:
    """The same second for people, RFC 3339 in UTC: what policy messages quote."""
    return datetime.fromtimestamp(epoch(moment), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
