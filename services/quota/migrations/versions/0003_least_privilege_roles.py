"""Least privilege: the quota service connects as `kiln_quota`, which may only read and
append the log (no UPDATE, DELETE, TRUNCATE, nor any change to its triggers: those need
the owner), and keep its projections and outbox; `kiln audit` connects as `kiln_auditor`,
which may only read. Migrations and `kiln accounts` run as the owner (the role in
KILN_DATABASE_URL), which needs CREATEROLE for this revision.

Roles belong to the PostgreSQL cluster, not the database: a second Kiln database on the
same server finds them there and only grants them its tables.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

from shared.settings import AUDITOR_ROLE, QUOTA_ROLE

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

PROJECTIONS = "quota_usage, quota_buckets, quota_outbox, quota_chain_head"


def upgrade() -> None:
    for role in (QUOTA_ROLE, AUDITOR_ROLE):
        # (Two databases migrating at once may race to create a role: the loser finds it.)
        op.execute(
            f"""
            DO $$ BEGIN
                IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN
                    CREATE ROLE {role} LOGIN;
                END IF;
            EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
            END $$
            """
        )
        op.execute(f"DO $$ BEGIN EXECUTE format('GRANT CONNECT ON DATABASE %I TO {role}', current_database()); END $$")
        op.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
    op.execute(f"GRANT SELECT, INSERT ON quota_events TO {QUOTA_ROLE}")
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {PROJECTIONS} TO {QUOTA_ROLE}")
    op.execute(f"GRANT SELECT ON accounts, alembic_version TO {QUOTA_ROLE}")
    op.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {QUOTA_ROLE}")
    op.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {AUDITOR_ROLE}")


def downgrade() -> None:
    for role in (QUOTA_ROLE, AUDITOR_ROLE):
        op.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}")
        op.execute(f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {role}")
        op.execute(f"REVOKE USAGE ON SCHEMA public FROM {role}")
