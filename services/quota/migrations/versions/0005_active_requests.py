"""Requests granted and not yet ended, per user: what a plan's `max_active` counts.

A row is added with each grant (in the append's statement) and removed when the request's
outcome reaches quota (delivered or failed). It is a projection of the bus, not of the
log, so a decision records the count it saw (`inputs.active`) for replay. A request whose
outcome never comes stops counting after `services.quota.log.ACTIVE_FOR`.

Revision ID: 0005
Revises: 0004
"""

from alembic import op

from shared.settings import AUDITOR_ROLE, QUOTA_ROLE

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE quota_active (
            user_id text NOT NULL,
            request_id text NOT NULL,
            granted_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (user_id, request_id)
        )
        """
    )
    op.execute(f"GRANT SELECT, INSERT, DELETE ON quota_active TO {QUOTA_ROLE}")
    op.execute(f"GRANT SELECT ON quota_active TO {AUDITOR_ROLE}")


def downgrade() -> None:
    op.execute("DROP TABLE quota_active")
