"""Tracing across the outbox: a nullable `traceparent` per outbox row, filled by place_orders().

The W3C traceparent of the create request travels with each order through the outbox to the
relay, which carries it in the broker message, so the publish and projection spans can link to
the order's trace (src/pydist/telemetry.py). NULL when tracing is off, and for older rows.

place_orders() is re-created to read `traceparent` from each order of its jsonb input. CREATE OR
REPLACE keeps the owner and the grants but resets SECURITY DEFINER and the pinned search_path, so
w0002's DEFINER block is applied again (tests/integration/test_roles.py checks it).

Revision ID: w0003
Revises: w0002
"""

from alembic import op

from pydist.migrations.write.versions.w0001_orders_cap_outbox import PLACE_ORDERS as W0001_PLACE_ORDERS
from pydist.migrations.write.versions.w0002_least_privilege_roles import DEFINER

revision = "w0003"
down_revision = "w0002"
branch_labels = None
depends_on = None

_W0001_REPLACE = W0001_PLACE_ORDERS.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)
# The w0001 function with two edits: the traceparent is read per order and stored in its outbox row.
_OLD_SELECT = "(e.v->>'btc')::numeric AS btc, e.v->>'request_id' AS rid"
_OLD_INSERT = "INSERT INTO outbox (order_id, request_id) VALUES (o.id, r.rid);"
PLACE_ORDERS = _W0001_REPLACE.replace(
    _OLD_SELECT, _OLD_SELECT + ",\n               e.v->>'traceparent' AS tp"
).replace(_OLD_INSERT, "INSERT INTO outbox (order_id, request_id, traceparent) VALUES (o.id, r.rid, r.tp);")
assert PLACE_ORDERS.count("traceparent") == 2, "w0001's place_orders() text changed: update w0003"


def upgrade() -> None:
    op.execute("ALTER TABLE outbox ADD COLUMN traceparent text")
    op.execute(PLACE_ORDERS)
    op.execute(DEFINER)


def downgrade() -> None:
    op.execute(_W0001_REPLACE)
    op.execute(DEFINER)
    op.execute("ALTER TABLE outbox DROP COLUMN traceparent")
