"""The append-only quota event log.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "quota_events",
        sa.Column("position", sa.BigInteger, sa.Identity(always=True), primary_key=True),
        sa.Column("stream_id", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("event_type", sa.Text, nullable=False),
        sa.Column("request_id", sa.Text, nullable=False),
        sa.Column("payload", JSONB, nullable=False),
        sa.Column("metadata", JSONB, nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.UniqueConstraint("stream_id", "version", name="quota_events_stream_version_key"),
    )
    # One decision per request, whichever replica made it. Request ids are the clients'
    # idempotency keys, unique within one user's stream.
    op.create_index(
        "quota_events_one_decision_per_request",
        "quota_events",
        ["stream_id", "request_id"],
        unique=True,
        postgresql_where=sa.text("event_type IN ('QuotaGranted', 'QuotaDenied')"),
    )
    # History is never edited: corrections are new, compensating events.
    op.execute(
        """
        CREATE FUNCTION quota_events_append_only() RETURNS trigger AS $$
        BEGIN
            RAISE EXCEPTION 'quota_events is append-only: % is not allowed', TG_OP;
        END;
        $$ LANGUAGE plpgsql
        """
    )
    op.execute(
        """
        CREATE TRIGGER quota_events_append_only
            BEFORE UPDATE OR DELETE OR TRUNCATE ON quota_events
            FOR EACH STATEMENT EXECUTE FUNCTION quota_events_append_only()
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE quota_events")
    op.execute("DROP FUNCTION quota_events_append_only()")
