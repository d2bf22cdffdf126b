"""Usage per API key, and how much of it was estimated.

`usage_counters` gains `key_id` (the API key a request used; '' for a token from the
identity provider), in its primary key, and `tokens_estimated` (of the tokens counted,
those a node did not report: Charter counted them). The gateway's group commit
(charter_audit_append) adds both from its counters JSON ("key", "est"); the function is
otherwise 0011's. Downgrading sums each team's rows of a serving name and day again.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-06 16:00:00
"""
import importlib.util
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None


def _seals_migration():  # type: ignore[no-untyped-def]
    """0011, whose function this one changes in its usage insert only (a frozen copy would
    be 190 lines of the same)."""
    path = Path(__file__).with_name("20261206_0700_0011_event_seals.py")
    spec = importlib.util.spec_from_file_location("charter_migration_0011", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


OLD_USAGE = """    INSERT INTO usage_counters (team_id, serving_name, day, requests, tokens_in, tokens_out)
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
        tokens_out = usage_counters.tokens_out + EXCLUDED.tokens_out;"""
NEW_USAGE = """    INSERT INTO usage_counters (team_id, key_id, serving_name, day, requests, tokens_in,
                                tokens_out, tokens_estimated)
    SELECT u.team, coalesce(u.key, ''), u.serving, u.day, sum(u.requests),
           sum(u.tokens_in), sum(u.tokens_out), sum(coalesce(u.est, 0))
    FROM json_to_recordset(counters) AS u(e int, team text, key text, serving text,
                                          day date, requests bigint, tokens_in bigint,
                                          tokens_out bigint, est bigint)
    WHERE results[u.e] = 'written'
    GROUP BY u.team, coalesce(u.key, ''), u.serving, u.day
    ORDER BY 1, 2, 3, 4
    ON CONFLICT (team_id, key_id, serving_name, day) DO UPDATE SET
        requests = usage_counters.requests + EXCLUDED.requests,
        tokens_in = usage_counters.tokens_in + EXCLUDED.tokens_in,
        tokens_out = usage_counters.tokens_out + EXCLUDED.tokens_out,
        tokens_estimated = usage_counters.tokens_estimated + EXCLUDED.tokens_estimated;"""


def _function(usage: str) -> str:
    m = _seals_migration()
    assert OLD_USAGE in m.FUNCTION, "0011's function changed: update this migration"
    return m.FUNCTION.replace(OLD_USAGE, usage).format(lock=m.CHAIN_LOCK_KEY,
                                                       insert=m.NEW_INSERT)


def upgrade() -> None:
    with op.batch_alter_table("usage_counters") as batch:
        batch.add_column(sa.Column("key_id", sa.String(16), nullable=False,
                                   server_default=""))
        batch.add_column(sa.Column("tokens_estimated", sa.BigInteger(), nullable=False,
                                   server_default="0"))
        batch.drop_constraint("pk_usage_counters", type_="primary")
        batch.create_primary_key("pk_usage_counters",
                                 ["team_id", "key_id", "serving_name", "day"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_function(NEW_USAGE))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_function(OLD_USAGE))
    op.execute("CREATE TABLE usage_merged AS SELECT team_id, serving_name, day, "
               "sum(requests) AS requests, sum(tokens_in) AS tokens_in, "
               "sum(tokens_out) AS tokens_out FROM usage_counters "
               "GROUP BY team_id, serving_name, day")
    op.execute("DELETE FROM usage_counters")
    with op.batch_alter_table("usage_counters") as batch:
        batch.drop_constraint("pk_usage_counters", type_="primary")
        batch.drop_column("tokens_estimated")
        batch.drop_column("key_id")
        batch.create_primary_key("pk_usage_counters", ["team_id", "serving_name", "day"])
    op.execute("INSERT INTO usage_counters (team_id, serving_name, day, requests, tokens_in, "
               "tokens_out) SELECT team_id, serving_name, day, requests, tokens_in, "
               "tokens_out FROM usage_merged")
    op.execute("DROP TABLE usage_merged")
