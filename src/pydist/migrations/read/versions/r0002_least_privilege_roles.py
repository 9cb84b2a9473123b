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

from pydist.migrations.roles import connect_only, connect_public, ensure_roles, schema_usage

revision = "r0002"
down_revision = "r0001"
branch_labels = None
depends_on = None

ROLES = ("pydist_sync", "pydist_fetch")


def upgrade() -> None:
    op.execute(ensure_roles(ROLES))
    op.execute("REVOKE ALL ON TABLE buy_orders FROM PUBLIC")
    op.execute("GRANT SELECT, INSERT ON buy_orders TO pydist_sync")
    op.execute("GRANT SELECT ON buy_orders TO pydist_fetch")
    op.execute(connect_only(ROLES))
    op.execute(schema_usage(ROLES))


def downgrade() -> None:
    op.execute(schema_usage(ROLES, grant=False))
    op.execute(connect_public(ROLES))
    op.execute(f"REVOKE ALL ON TABLE buy_orders FROM {', '.join(ROLES)}")
