"""Least privilege on the read model: one NOLOGIN role per process, granted exactly its job.

- pydist_sync (read_model_sync, and the relay's read-model connection when it projects directly,
  without a broker): SELECT and INSERT on buy_orders. The projector only ever inserts
  (ON CONFLICT DO NOTHING ... RETURNING); the admin's rebuild, which updates and deletes, runs as
  the owner, so sync gets no UPDATE and no DELETE.
- pydist_fetch (fetch_buy_orders): SELECT on buy_orders, nothing else.
- CONNECT (and TEMPORARY) on this database: revoked from PUBLIC, CONNECT granted to those two
  roles only. So pydist_create and pydist_relay (write side) cannot even connect here. This is the
  database's own ACL, not cluster configuration; superusers and the owner are unaffected.

Roles are cluster-wide: created only if missing (racing migrations of other databases are
tolerated), never altered, never dropped on downgrade. Operators give them LOGIN and a password
outside the repository (docs/security.md).

Revision ID: r0002
Revises: r0001
"""

from alembic import op

revision = "r0002"
down_revision = "r0001"
branch_labels = None
depends_on = None

ROLES = ("pydist_sync", "pydist_fetch")

ENSURE_ROLES = """
DO $roles$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY[{names}] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- created meanwhile by a migration of another database
            END;
        END IF;
    END LOOP;
END
$roles$
"""

DATABASE_ACL = """
DO $acl$
BEGIN
    EXECUTE format('REVOKE CONNECT, TEMPORARY ON DATABASE %I FROM PUBLIC', current_database());
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO {roles}', current_database());
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO {roles}', current_schema());
END
$acl$
"""

DATABASE_ACL_UNDO = """
DO $acl$
BEGIN
    EXECUTE format('REVOKE USAGE ON SCHEMA %I FROM {roles}', current_schema());
    EXECUTE format('REVOKE CONNECT ON DATABASE %I FROM {roles}', current_database());
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO PUBLIC', current_database());
END
$acl$
"""


def upgrade() -> None:
    op.execute(ENSURE_ROLES.format(names=", ".join(f"'{r}'" for r in ROLES)))
    op.execute("REVOKE ALL ON TABLE buy_orders FROM PUBLIC")
    op.execute("GRANT SELECT, INSERT ON buy_orders TO pydist_sync")
    op.execute("GRANT SELECT ON buy_orders TO pydist_fetch")
    op.execute(DATABASE_ACL.format(roles=", ".join(ROLES)))


def downgrade() -> None:
    op.execute(DATABASE_ACL_UNDO.format(roles=", ".join(ROLES)))
    op.execute(f"REVOKE ALL ON TABLE buy_orders FROM {', '.join(ROLES)}")
