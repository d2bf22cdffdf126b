"""Event seals: every audit event carries a unique id and a seal made before the database
saw it (charter.audit.seal; the MAC and its key schedule are in charter.audit.verify).

Adds `audit_events.event_id` (unique; its first 12 hex digits are the clock in ms) and
`audit_events.seal` ("<epoch>.<HMAC-SHA256>"), both empty for the events written before.
The gateway's group commit (charter_audit_append) inserts them from its events JSON
("id", "seal"); the function is otherwise 0010's, a frozen copy.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 07:00:00
"""
import sqlalchemy as sa
from alembic import op


revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None

CHAIN_LOCK_KEY = 0x43484152544552  # charter.audit.journal.CHAIN_LOCK_KEY, a frozen copy

FUNCTION = """
CREATE OR REPLACE FUNCTION charter_audit_append(entries json, events json, counters json,
                                     quota_day date,
                                     OUT generation bigint, OUT results text[],
                                     OUT seqs bigint[])
LANGUAGE plpgsql AS $$
-- entries:  [{{"g": generation decided on or null, "q": quota team or null, "l": its daily
--             limit, "n": requests asked}}, ...]
-- events:   [{{"e": entry (1-based), "x": true when written only if the entry is over
--             quota (its refusal), "actor", "action", "target_type", "target_id",
--             "outcome", "details" (canonical JSON text), "request_id", "pre", "post",
--             "mid", "tail" (charter.audit.chain.hash_parts)}}, ...]
-- counters: [{{"e": entry, "team", "serving", "day", "requests", "tokens_in",
--             "tokens_out"}}, ...]
DECLARE
    e_gen bigint[];
    e_team text[];
    e_limit bigint[];
    e_asked bigint[];
    n int;
    m int;
    head_seq bigint;
    head_hash text;
    q_teams text[];
    q_used bigint[];
    k int;
    r text;
    v record;
    stamp timestamptz;
    digest text;
    w_seq bigint[] := '{{}}';
    w_ts timestamptz[] := '{{}}';
    w_prev text[] := '{{}}';
    w_hash text[] := '{{}}';
    w_idx int[] := '{{}}';
BEGIN
    SELECT coalesce(array_agg(x.g ORDER BY x.i), '{{}}'),
           coalesce(array_agg(x.q ORDER BY x.i), '{{}}'),
           coalesce(array_agg(x.l ORDER BY x.i), '{{}}'),
           coalesce(array_agg(x.n ORDER BY x.i), '{{}}')
        INTO e_gen, e_team, e_limit, e_asked
        FROM ROWS FROM (json_to_recordset(entries) AS (g bigint, q text, l bigint, n bigint))
             WITH ORDINALITY AS x(g, q, l, n, i);
    n := coalesce(array_length(e_gen, 1), 0);
    m := json_array_length(events);

    PERFORM pg_advisory_xact_lock({lock});
    -- Each statement below takes its own snapshot: all of them see what was committed
    -- before the lock was granted.
    SELECT g.value INTO generation FROM change_generation g WHERE g.id = 1;
    SELECT a.seq, a.hash INTO head_seq, head_hash
        FROM audit_events a ORDER BY a.seq DESC LIMIT 1;
    head_seq := coalesce(head_seq, 0);
    head_hash := coalesce(head_hash, repeat('0', 64));
    SELECT coalesce(array_agg(c.team_id), '{{}}'), coalesce(array_agg(c.used), '{{}}')
        INTO q_teams, q_used
        FROM (SELECT uc.team_id, sum(uc.requests)::bigint AS used FROM usage_counters uc
              WHERE uc.day = quota_day AND uc.team_id = ANY(e_team)
              GROUP BY uc.team_id) c;

    results := array_fill(NULL::text, ARRAY[n]);
    FOR i IN 1 .. n LOOP
        IF e_gen[i] IS NOT NULL AND e_gen[i] <> generation THEN
            results[i] := 'stale';
            CONTINUE;
        END IF;
        IF e_team[i] IS NOT NULL THEN
            k := array_position(q_teams, e_team[i]);
            IF k IS NULL THEN
                q_teams := q_teams || e_team[i];
                q_used := q_used || 0::bigint;
                k := array_length(q_teams, 1);
            END IF;
            IF q_used[k] + e_asked[i] > e_limit[i] THEN
                results[i] := 'over_quota';
                CONTINUE;
            END IF;
            q_used[k] := q_used[k] + e_asked[i];
        END IF;
        results[i] := 'written';
    END LOOP;

    seqs := array_fill(NULL::bigint, ARRAY[m]);
    FOR v IN SELECT x.j, x.e, x.x, x.details, x.pre, x.post, x.mid, x.tail
             FROM ROWS FROM (json_to_recordset(events) AS (e int, x boolean, details text,
                             pre text, post text, mid text, tail text))
                  WITH ORDINALITY AS x(e, x, details, pre, post, mid, tail, j)
             ORDER BY x.j LOOP
        r := results[v.e];
        CONTINUE WHEN NOT coalesce((r = 'written' AND NOT v.x) OR (r = 'over_quota' AND v.x),
                                   false);
        head_seq := head_seq + 1;
        stamp := clock_timestamp();
        digest := encode(sha256(convert_to(
            v.pre || v.details || v.post || head_hash || v.mid || head_seq::text || v.tail
            || to_char(stamp AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') || '"}}',
            'UTF8')), 'hex');
        w_seq := w_seq || head_seq;
        w_ts := w_ts || stamp;
        w_prev := w_prev || head_hash;
        w_hash := w_hash || digest;
        w_idx := w_idx || v.j;
        seqs[v.j] := head_seq;
        head_hash := digest;
    END LOOP;

{insert}

    INSERT INTO usage_counters (team_id, serving_name, day, requests, tokens_in, tokens_out)
    SELECT u.team, u.serving, u.day, sum(u.requests), sum(u.tokens_in), sum(u.tokens_out)
    FROM json_to_recordset(counters) AS u(e int, team text, serving text, day date,
                                          requests bigint, tokens_in bigint,
                                          tokens_out bigint)
    WHERE results[u.e] = 'written'
    GROUP BY u.team, u.serving, u.day
    ORDER BY u.team, u.serving, u.day
    ON CONFLICT (team_id, serving_name, day) DO UPDATE SET
        requests = usage_counters.requests + EXCLUDED.requests,
        tokens_in = usage_counters.tokens_in + EXCLUDED.tokens_in,
        tokens_out = usage_counters.tokens_out + EXCLUDED.tokens_out;
END $$;
"""
OLD_INSERT = """    INSERT INTO audit_events (seq, ts, actor, action, target_type, target_id, outcome,
                              details, request_id, prev_hash, hash)
    SELECT w.s, w.t, x.actor, x.action, x.target_type, x.target_id, x.outcome,
           x.details::json, x.request_id, w.p, w.h
    FROM unnest(w_seq, w_ts, w_prev, w_hash, w_idx) AS w(s, t, p, h, j)
    JOIN ROWS FROM (json_to_recordset(events) AS (actor text, action text,
                    target_type text, target_id text, outcome text, details text,
                    request_id text))
         WITH ORDINALITY AS x(actor, action, target_type, target_id, outcome, details,
                              request_id, j) ON x.j = w.j
    ORDER BY w.s;"""
NEW_INSERT = """    INSERT INTO audit_events (seq, ts, actor, action, target_type, target_id, outcome,
                              details, request_id, prev_hash, hash, event_id, seal)
    SELECT w.s, w.t, x.actor, x.action, x.target_type, x.target_id, x.outcome,
           x.details::json, x.request_id, w.p, w.h, x.id, x.seal
    FROM unnest(w_seq, w_ts, w_prev, w_hash, w_idx) AS w(s, t, p, h, j)
    JOIN ROWS FROM (json_to_recordset(events) AS (actor text, action text,
                    target_type text, target_id text, outcome text, details text,
                    request_id text, id text, seal text))
         WITH ORDINALITY AS x(actor, action, target_type, target_id, outcome, details,
                              request_id, id, seal, j) ON x.j = w.j
    ORDER BY w.s;"""


def _function(insert: str) -> str:
    return FUNCTION.format(lock=CHAIN_LOCK_KEY, insert=insert)


def upgrade() -> None:
    # Plain ADD COLUMN on both (SQLite's batch mode would copy the table and lose its
    # append-only triggers).
    op.add_column('audit_events', sa.Column('event_id', sa.String(length=32), nullable=True))
    op.add_column('audit_events', sa.Column('seal', sa.String(length=84), nullable=True))
    if op.get_bind().dialect.name == 'postgresql':
        op.create_unique_constraint('uq_audit_events_event_id', 'audit_events', ['event_id'])
        op.execute(_function(NEW_INSERT))
    else:
        op.create_index('uq_audit_events_event_id', 'audit_events', ['event_id'], unique=True)


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(_function(OLD_INSERT))
        op.drop_constraint('uq_audit_events_event_id', 'audit_events', type_='unique')
    else:
        op.drop_index('uq_audit_events_event_id', 'audit_events')
    op.drop_column('audit_events', 'seal')
    op.drop_column('audit_events', 'event_id')
