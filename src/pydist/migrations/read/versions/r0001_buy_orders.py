"""Read model: one table shaped for the newest-first keyset listing.

Revision ID: r0001
"""

from alembic import op

revision = "r0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE buy_orders (
            id uuid PRIMARY KEY,
            created_at timestamptz NOT NULL,
            currency text NOT NULL,
            currency_amount numeric(12, 2) NOT NULL,
            btc_rate numeric NOT NULL,
            btc_amount numeric(18, 8) NOT NULL,
            idempotence_key uuid NOT NULL,
            event_id uuid NOT NULL,
            projected_at timestamptz NOT NULL DEFAULT clock_timestamp()
        )
        """
    )
    # Covering index: a page is one index-only range scan, whatever its depth.
    op.execute(
        "CREATE INDEX buy_orders_newest_first ON buy_orders (created_at DESC, id DESC) "
        "INCLUDE (currency, currency_amount, btc_rate, btc_amount, idempotence_key)"
    )


def downgrade() -> None:
    op.execute("DROP TABLE buy_orders")
