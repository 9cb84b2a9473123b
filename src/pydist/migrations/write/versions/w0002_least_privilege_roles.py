"""Least privilege on the write model: one NOLOGIN role per process, granted exactly its job.

- pydist_create (create_buy_order): SELECT buy_orders (replays) and btc_cap (cap gauges), EXECUTE
  place_orders(). Nothing else: no direct INSERT, UPDATE or DELETE anywhere.
- pydist_relay: SELECT buy_orders, SELECT outbox and UPDATE of outbox.published_at only (the claim
  locks rows FOR UPDATE, which needs that UPDATE right).
- pydist_place_orders: never logs in; it owns place_orders(), now SECURITY DEFINER, and holds just
  what that function does (SELECT/INSERT buy_orders, INSERT outbox, SELECT btc_cap and UPDATE of
  btc_cap.used_btc). So the create service can store orders only through the function that checks
  the cap: it cannot insert around it, reset used_btc or raise limit_btc. The function's
  search_path is pinned to its own schema (then pg_temp), as a definer function's must be.
- CONNECT (and TEMPORARY) on this database: revoked from PUBLIC, CONNECT granted to the two roles
  above. That is this database's own ACL, not cluster configuration: other databases and
  superusers are untouched; the database owner keeps its rights.

Roles are cluster-wide: created only if missing (concurrent migrations of other databases may
race to create them; the loser's error is swallowed), never altered (an operator's LOGIN and
password survive), never dropped on downgrade (other databases may use them). They are NOLOGIN:
operators give each LOGIN and a password outside the repository (docs/security.md).

A later migration that re-creates place_orders() (CREATE OR REPLACE resets SECURITY DEFINER and
the search_path) must re-apply them; tests/integration/test_roles.py fails if it does not.

Revision ID: w0002
Revises: w0001
"""

from alembic import op

from pydist.migrations.roles import connect_only, connect_public, ensure_roles, schema_usage

revision = "w0002"
down_revision = "w0001"
branch_labels = None
depends_on = None

ROLES = ("pydist_create", "pydist_relay", "pydist_place_orders")
LOGIN_ROLES = ("pydist_create", "pydist_relay")

# place_orders() becomes SECURITY DEFINER owned by pydist_place_orders. A superuser may hand the
# function over directly; another owner needs to be able to become that role and the role needs
# CREATE on the schema for the hand-over, which is granted for that statement only. If the
# hand-over is refused, the function stays owned by the migration's role (still SECURITY DEFINER,
# still pinned) and a warning says so.
DEFINER = """
DO $definer$
DECLARE
    schema_name text := current_schema();
BEGIN
    EXECUTE format(
        'ALTER FUNCTION place_orders(jsonb) SECURITY DEFINER SET search_path = %I, pg_temp',
        schema_name
    );
    BEGIN
        EXECUTE format('GRANT CREATE ON SCHEMA %I TO pydist_place_orders', schema_name);
        ALTER FUNCTION place_orders(jsonb) OWNER TO pydist_place_orders;
        EXECUTE format('REVOKE CREATE ON SCHEMA %I FROM pydist_place_orders', schema_name);
    EXCEPTION WHEN insufficient_privilege THEN
        RAISE WARNING 'place_orders() stays owned by %: it could not be given to pydist_place_orders',
            current_user;
    END;
END
$definer$
"""


def upgrade() -> None:
    op.execute(ensure_roles(ROLES))
    op.execute(schema_usage(ROLES))
    op.execute("REVOKE ALL ON TABLE buy_orders, btc_cap, outbox FROM PUBLIC")
    op.execute("REVOKE ALL ON FUNCTION place_orders(jsonb) FROM PUBLIC")
    op.execute("REVOKE ALL ON FUNCTION buy_orders_append_only() FROM PUBLIC")

    # What place_orders() itself does, for its owner.
    op.execute("GRANT SELECT, INSERT ON buy_orders TO pydist_place_orders")
    op.execute("GRANT INSERT ON outbox TO pydist_place_orders")
    op.execute("GRANT SELECT, UPDATE (used_btc) ON btc_cap TO pydist_place_orders")
    op.execute(DEFINER)

    op.execute("GRANT SELECT ON buy_orders, btc_cap TO pydist_create")
    op.execute("GRANT EXECUTE ON FUNCTION place_orders(jsonb) TO pydist_create")

    op.execute("GRANT SELECT ON buy_orders TO pydist_relay")
    op.execute("GRANT SELECT, UPDATE (published_at) ON outbox TO pydist_relay")

    op.execute(connect_only(LOGIN_ROLES))


def downgrade() -> None:
    op.execute(connect_public(LOGIN_ROLES))
    op.execute("ALTER FUNCTION place_orders(jsonb) OWNER TO CURRENT_USER")
    op.execute("ALTER FUNCTION place_orders(jsonb) SECURITY INVOKER RESET search_path")
    op.execute("GRANT EXECUTE ON FUNCTION place_orders(jsonb) TO PUBLIC")
    op.execute("GRANT EXECUTE ON FUNCTION buy_orders_append_only() TO PUBLIC")
    roles = ", ".join(ROLES)
    op.execute(f"REVOKE ALL ON TABLE buy_orders, btc_cap, outbox FROM {roles}")
    op.execute(f"REVOKE ALL ON FUNCTION place_orders(jsonb) FROM {roles}")
    op.execute(schema_usage(ROLES, grant=False))
