"""The log in partitions: N hash chains, each with its own head and lock.

A user's events go to partition `hash(user) mod N` (`services/quota/log.py`,
`partition_of`), so appends for users of different partitions no longer wait for one lock,
and one user's decisions stay totally ordered (their partition's lock, and the unique
`(stream_id, version)` as the database's own guard). Existing events are partition 0: a
log from before this revision is one chain, and stays one.

`quota_chain_head` gets one row per partition, with the position of its last event, which
is what a checkpoint signs. The number of partitions is the number of rows; `python -m
services.quota.migrate` adds rows up to KILN_QUOTA_PARTITIONS and never removes one.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A column with a constant default: no rewrite of the rows (and no UPDATE, which the
    # append-only trigger would refuse).
    op.execute("ALTER TABLE quota_events ADD COLUMN partition smallint NOT NULL DEFAULT 0")
    op.execute("CREATE INDEX quota_events_partition_position ON quota_events (partition, position)")
    op.execute(
        "ALTER TABLE quota_chain_head ADD COLUMN partition smallint NOT NULL DEFAULT 0 PRIMARY KEY,"
        " ADD COLUMN position bigint"
    )
    op.execute("UPDATE quota_chain_head SET position = (SELECT max(position) FROM quota_events)")


def downgrade() -> None:
    op.execute("DELETE FROM quota_chain_head WHERE partition <> 0")
    op.execute("ALTER TABLE quota_chain_head DROP COLUMN partition, DROP COLUMN position")
    op.execute("DROP INDEX quota_events_partition_position")
    op.execute("ALTER TABLE quota_events DROP COLUMN partition")
