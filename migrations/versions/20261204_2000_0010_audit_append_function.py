"""The gateway's group commit in one round trip: charter_audit_append().

One call, in its own (autocommit) transaction, takes the chain lock, reads the change
generation, the head of the chain and the day's requests of the quota teams, decides
each entry (written, stale or over_quota), stamps, chains and inserts its events, adds
the usage counters, and commits. The lock is held for the server-side work and the
commit only, never across a network round trip.

The batch arrives as three JSON documents (entries, events, counters): one text
parameter each, which the client encodes in C and the server parses in one pass each.
The hash of an event is SHA-256 over its RFC 8785 bytes; the caller sends those bytes in
the parts that do not depend on the event's place in the chain (charter.audit.chain
.hash_parts), and the function joins them with the previous hash, the sequence number and
the time, in key order. audit.chain.event_hash recomputes the same bytes from the row.

PostgreSQL only: SQLite (the demo) writes the same rows from Python.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 20:00:00
"""
from alembic import op


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

CHAIN_LOCK_KEY = 0x43484152544552  # charter.audit.journal.CHAIN_LOCK_KEY, a frozen copy (a test
#                                  checks that the function waits on the service's lock)

PG_UP = f"""
CREATE FUNCTION charter_audit_append(entries json, events json, counters json,
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

    PERFORM pg_advisory_xact_lock({CHAIN_LOCK_KEY});
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

    INSERT INTO audit_events (seq, ts, actor, action, target_type, target_id, outcome,
                              details, request_id, prev_hash, hash)
    SELECT w.s, w.t, x.actor, x.action, x.target_type, x.target_id, x.outcome,
           x.details::json, x.request_id, w.p, w.h
    FROM unnest(w_seq, w_ts, w_prev, w_hash, w_idx) AS w(s, t, p, h, j)
    JOIN ROWS FROM (json_to_recordset(events) AS (actor text, action text,
                    target_type text, target_id text, outcome text, details text,
                    request_id text))
         WITH ORDINALITY AS x(actor, action, target_type, target_id, outcome, details,
                              request_id, j) ON x.j = w.j
    ORDER BY w.s;

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
PG_DOWN = "DROP FUNCTION charter_audit_append(json, json, json, date);"


def upgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(PG_UP)


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(PG_DOWN)
