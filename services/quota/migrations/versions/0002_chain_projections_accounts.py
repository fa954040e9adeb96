"""Hash chain on the log; usage and bucket projections; accounts; the outbox.

Revision ID: 0002
Revises: 0001
"""

import json

import sqlalchemy as sa
from alembic import op

from services.quota import chain

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


TABLES = [
    """
    CREATE TABLE accounts (
        user_id text PRIMARY KEY,
        plan text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    )
    """,
    """
    CREATE TABLE quota_usage (
        user_id text NOT NULL,
        day text NOT NULL,
        granted integer NOT NULL DEFAULT 0,
        refunded integer NOT NULL DEFAULT 0,
        extra integer NOT NULL DEFAULT 0,
        PRIMARY KEY (user_id, day)
    )
    """,
    """
    CREATE TABLE quota_buckets (
        user_id text PRIMARY KEY,
        tokens double precision,
        at timestamptz
    )
    """,
    """
    CREATE TABLE quota_outbox (
        position bigint PRIMARY KEY,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp()  -- after the lock wait
    )
    """,
]


def upgrade() -> None:
    op.execute("ALTER TABLE quota_events ADD COLUMN prev_hash text, ADD COLUMN hash text")
    _chain_existing_events()
    op.execute("ALTER TABLE quota_events ALTER COLUMN prev_hash SET NOT NULL, ALTER COLUMN hash SET NOT NULL")
    # One refund per request, whichever replica saw the failure.
    op.execute(
        "CREATE UNIQUE INDEX quota_events_one_refund_per_request ON quota_events (stream_id, request_id)"
        " WHERE event_type = 'QuotaRefunded'"
    )
    for table in TABLES:
        op.execute(table)
    # The chain's head: locking this row is how appenders take turns.
    op.execute("CREATE TABLE quota_chain_head (hash text NOT NULL)")
    op.execute(
        sa.text("INSERT INTO quota_chain_head VALUES (coalesce("
                "(SELECT hash FROM quota_events ORDER BY position DESC LIMIT 1), :genesis))"
        ).bindparams(genesis=chain.GENESIS)
    )
    # Usage from the decisions logged before this revision (they carry no bucket).
    op.execute(
        """
        INSERT INTO quota_usage (user_id, day, granted)
        SELECT substr(stream_id, 6), payload->>'day', count(*) FROM quota_events
        WHERE event_type = 'QuotaGranted' GROUP BY 1, 2
        """
    )


def _chain_existing_events() -> None:
    """Hash the rows written before the chain existed, in position order. The only time
    the log is written to other than by appending: the trigger is off for this alone."""
    bind = op.get_bind()
    rows = bind.execute(sa.text("SELECT * FROM quota_events ORDER BY position")).mappings().all()
    if not rows:
        return
    op.execute("ALTER TABLE quota_events DISABLE TRIGGER quota_events_append_only")
    prev = chain.GENESIS
    for row in rows:
        content = {
            key: json.loads(row[key]) if isinstance(row[key], str) else row[key]
            for key in ("payload", "metadata")
        }
        digest = chain.event_hash(
            stream_id=row["stream_id"], version=row["version"], event_type=row["event_type"],
            request_id=row["request_id"], recorded_at=row["recorded_at"], prev_hash=prev, **content,
        )
        bind.execute(
            sa.text("UPDATE quota_events SET prev_hash = :prev, hash = :hash WHERE position = :position"),
            {"prev": prev, "hash": digest, "position": row["position"]},
        )
        prev = digest
    op.execute("ALTER TABLE quota_events ENABLE TRIGGER quota_events_append_only")


def downgrade() -> None:
    op.execute("DROP TABLE quota_chain_head, quota_outbox, quota_buckets, quota_usage, accounts")
    op.execute("DROP INDEX quota_events_one_refund_per_request")
    op.execute("ALTER TABLE quota_events DISABLE TRIGGER quota_events_append_only")
    op.execute("ALTER TABLE quota_events DROP COLUMN prev_hash, DROP COLUMN hash")
    op.execute("ALTER TABLE quota_events ENABLE TRIGGER quota_events_append_only")
