"""The unit of work, and the two doors into the audit log.

- `record(session, ...)` / `record_event(session, event)`: an event written inside the
  caller's unit of work, in the same transaction as the change it records.
- A refusal: raise a CharterError marked `.audited(...)`. The unit of work it leaves rolls
  back, then records the refusal in a transaction of its own; raised outside any unit of
  work, `refuse(exc)` records it at once. Policy decisions recorded in a unit of work that
  rolls back (`record_decision`) are written again with the refusal, so a decision that
  was taken is never lost with the action it refused.

Nothing else writes audit events: not error handlers, not hooks on flags, not helpers that
commit on their own. The gateway's group writer (charter.audit.writer) is the same doors
for the dispatch path, batched: a decision's events, or its refusal's, in one commit.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from charter import scope
from charter.errors import (
    CharterError,
    ConflictError,
    DatabaseUnavailableError,
    StaleVersionError,
    ValidationFailedError,
)

if TYPE_CHECKING:
    from charter.audit.journal import Event

_session_var: contextvars.ContextVar[Session | None] = contextvars.ContextVar(
    "charter_session", default=None)
_DECISIONS = "charter.decisions"  # session.info key: decision events to keep on rollback
_recorded: contextvars.ContextVar[list[Recorded] | None] = contextvars.ContextVar(
    "charter_recorded", default=None)


class Recorded(NamedTuple):
    """An event door one wrote: what a receipt is made of once its transaction commits."""

    action: str
    target_type: str
    target_id: str
    seq: int
    hash: str


@contextmanager
def collecting() -> Iterator[list[Recorded]]:
    """Collect the events door one writes in the block (for receipts: read them only once
    the block returned, when their transactions have committed)."""
    found: list[Recorded] = []
    token = _recorded.set(found)
    try:
        yield found
    finally:
        _recorded.reset(token)


@contextmanager
def unit_of_work() -> Iterator[Session]:
    """Commit on success, roll back on error, map driver errors to CharterError.

    A nested call joins the outer transaction. Leaving with a CharterError marked
    `.audited(...)` records the refusal after the rollback (with the policy decisions the
    unit of work had recorded).
    """
    outer = _session_var.get()
    if outer is not None:
        yield outer
        return
    session = scope.current().database.sessions()
    token = _session_var.set(session)
    decisions: list[Event] = []
    try:
        try:
            session.info[_DECISIONS] = decisions
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            _session_var.reset(token)
            session.close()
    except CharterError as exc:
        if exc.audit is not None or exc.events or decisions:
            _record_after_rollback(exc, decisions)
        raise
    except StaleDataError as exc:
        _record_after_rollback(None, decisions)
        raise StaleVersionError(
            "the record was changed by someone else; reload it and try again"
        ) from exc
    except sa_exc.IntegrityError as exc:
        _record_after_rollback(None, decisions)
        raise ConflictError(
            "the change conflicts with existing data",
            details={"reason": str(exc.orig).splitlines()[0] if exc.orig else "integrity"},
        ) from exc
    except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError) as exc:
        raise DatabaseUnavailableError("the database is unavailable; try again later") from exc
    except sa_exc.DataError as exc:
        # A value the column cannot hold (a number out of range, say): the caller's input,
        # which the API's schemas bound; this is the net beneath them.
        raise _out_of_range(str(exc.orig).splitlines()[0][:200] if exc.orig
                            else "out of range") from exc
    except sa_exc.ProgrammingError as exc:
        if getattr(exc.orig, "sqlstate", None) != "42501":  # insufficient_privilege
            raise
        # The app's role may not write a table it must (the audit log, say): nothing was
        # changed, and nothing may go on unrecorded. An operator's problem, not the caller's.
        raise DatabaseUnavailableError(
            "the database refused a write this action needs (permission denied); nothing "
            "was changed", details={"reason": "permission_denied"}) from exc


def _out_of_range(message: str) -> ValidationFailedError:
    return ValidationFailedError(
        "a value is out of range for what Charter stores",
        details={"errors": [{"field": "body", "code": "out_of_range", "message": message}]})


def in_unit_of_work() -> bool:
    return _session_var.get() is not None


def record(session: Session, *, actor: str, action: str, target_type: str, target_id: str,
           outcome: str = "success", details: dict[str, Any] | None = None) -> tuple[int, str]:
    """Door one: write an audit event in the caller's unit of work; returns (seq, hash)."""
    journal = scope.current().journal
    return _collect(action, target_type, target_id, journal.append(session, journal.event(
        actor=actor, action=action, target_type=target_type, target_id=target_id,
        outcome=outcome, details=details)))


def record_event(session: Session, event: Event) -> tuple[int, str]:
    """Door one, for an event already made (e.g. by charter.policy.service.evaluate)."""
    return _collect(event.action, event.target_type, event.target_id,
                    scope.current().journal.append(session, event))


def _collect(action: str, target_type: str, target_id: str,
             written: tuple[int, str]) -> tuple[int, str]:
    found = _recorded.get()
    if found is not None:
        found.append(Recorded(action, target_type, target_id, *written))
    return written


def record_decision(session: Session, event: Event) -> tuple[int, str]:
    """Door one for a policy decision: written now, and again after the rollback if the
    unit of work fails (the decision was taken, whatever became of the action)."""
    found = session.info.get(_DECISIONS)
    if found is not None:
        found.append(event)
    return scope.current().journal.append(session, event)


def refuse(exc: CharterError) -> NoReturn:
    """Door two outside a unit of work: raise an audited refusal, recording it now in a
    transaction of its own. Inside one, it is recorded after the rollback."""
    if _session_var.get() is None and (exc.audit is not None or exc.events):
        _record_after_rollback(exc, [])
    raise exc


def _record_after_rollback(exc: CharterError | None, decisions: list[Event]) -> None:
    """Door two: the refusal, after the decisions that led to it and the events the error
    carries (`exc.events`), in a fresh transaction. If that cannot be written, the
    failure (database_unavailable) is raised instead: never an unrecorded refusal."""
    journal = scope.current().journal
    events = list(decisions)
    if exc is not None:
        events.extend(exc.events)
        exc.events = ()
        refusal, exc.audit = exc.audit, None  # written once, even if re-raised again
        if refusal is not None:
            events.append(journal.event(
                actor=refusal.actor, action=refusal.action, target_type=refusal.target_type,
                target_id=refusal.target_id, outcome="denied",
                details={"code": exc.code, "message": exc.message, **exc.details}))
    if not events:
        return
    with unit_of_work() as session:
        for event in events:
            journal.append(session, event)
