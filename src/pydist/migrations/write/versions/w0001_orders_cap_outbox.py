"""Write model: append-only orders, the one-row BTC cap, the outbox and place_orders().

Revision ID: w0001
"""

from alembic import op

from pydist.domain.money import BTC_CAP

revision = "w0001"
down_revision = None
branch_labels = None
depends_on = None

PLACE_ORDERS = r"""
CREATE FUNCTION place_orders(reqs jsonb)
RETURNS TABLE (
    idx int, outcome text, order_id uuid, key uuid, created_at timestamptz,
    currency text, currency_amount numeric, btc_rate numeric, btc_amount numeric,
    available_btc numeric
)
LANGUAGE plpgsql AS $fn$
-- One round trip stores a whole batch: each order is checked against the cap in turn, so the
-- cap stays exact, and the cap row is locked once and updated once per batch, not per order.
#variable_conflict use_column
DECLARE
    cap_used numeric;
    cap_limit numeric;
    r record;
    o buy_orders%ROWTYPE;
    n_created int := 0;
BEGIN
    SELECT c.used_btc, c.limit_btc INTO cap_used, cap_limit FROM btc_cap c WHERE c.id = 1 FOR UPDATE;
    FOR r IN
        SELECT (e.ord - 1)::int AS i, (e.v->>'key')::uuid AS k, e.v->>'currency' AS cur,
               (e.v->>'amount')::numeric AS amt, (e.v->>'rate')::numeric AS rate,
               (e.v->>'btc')::numeric AS btc, e.v->>'request_id' AS rid
        FROM jsonb_array_elements(reqs) WITH ORDINALITY AS e(v, ord)
    LOOP
        idx := r.i;
        available_btc := NULL;
        SELECT * INTO o FROM buy_orders b WHERE b.idempotence_key = r.k;
        IF FOUND THEN
            outcome := 'existing';
        ELSIF cap_used + r.btc > cap_limit THEN
            outcome := 'cap_exceeded';
            available_btc := cap_limit - cap_used;
            order_id := NULL; key := r.k; created_at := NULL; currency := r.cur;
            currency_amount := r.amt; btc_rate := r.rate; btc_amount := r.btc;
            RETURN NEXT;
            CONTINUE;
        ELSE
            INSERT INTO buy_orders (idempotence_key, currency, currency_amount, btc_rate, btc_amount)
            VALUES (r.k, r.cur, r.amt, r.rate, r.btc)
            RETURNING * INTO o;
            INSERT INTO outbox (order_id, request_id) VALUES (o.id, r.rid);
            cap_used := cap_used + r.btc;
            n_created := n_created + 1;
            outcome := 'created';
        END IF;
        order_id := o.id; key := o.idempotence_key; created_at := o.created_at;
        currency := o.currency; currency_amount := o.currency_amount;
        btc_rate := o.btc_rate; btc_amount := o.btc_amount;
        RETURN NEXT;
    END LOOP;
    IF n_created > 0 THEN
        UPDATE btc_cap SET used_btc = cap_used WHERE id = 1;
        PERFORM pg_notify('pydist_outbox', '');
    END IF;
END
$fn$
"""


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE buy_orders (
            id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            idempotence_key uuid NOT NULL UNIQUE,
            created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
            currency text NOT NULL CHECK (currency IN ('EUR', 'GBP', 'USD')),
            currency_amount numeric(12, 2) NOT NULL
                CHECK (currency_amount > 0 AND currency_amount < 1000000000),
            btc_rate numeric NOT NULL CHECK (btc_rate > 0),
            btc_amount numeric(18, 8) NOT NULL CHECK (btc_amount > 0)
        )
        """
    )
    op.execute(
        """
        CREATE FUNCTION buy_orders_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'buy_orders is append-only (% refused)', TG_OP;
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER buy_orders_append_only BEFORE UPDATE OR DELETE ON buy_orders "
        "FOR EACH ROW EXECUTE FUNCTION buy_orders_append_only()"
    )
    op.execute(
        """
        CREATE TABLE btc_cap (
            id smallint PRIMARY KEY CHECK (id = 1),
            limit_btc numeric(18, 8) NOT NULL,
            used_btc numeric(18, 8) NOT NULL DEFAULT 0,
            CHECK (used_btc >= 0 AND used_btc <= limit_btc)
        )
        """
    )
    # The cap's size is the domain's (domain/money.py); the table only holds it.
    op.execute(f"INSERT INTO btc_cap (id, limit_btc, used_btc) VALUES (1, {BTC_CAP}, 0)")
    op.execute(
        """
        CREATE TABLE outbox (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            event_id uuid NOT NULL UNIQUE DEFAULT gen_random_uuid(),
            event_type text NOT NULL DEFAULT 'buy_order.created',
            order_id uuid NOT NULL REFERENCES buy_orders (id),
            request_id text,
            created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
            published_at timestamptz
        )
        """
    )
    op.execute("CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL")
    op.execute(PLACE_ORDERS)


def downgrade() -> None:
    op.execute("DROP FUNCTION place_orders(jsonb)")
    op.execute("DROP TABLE outbox")
    op.execute("DROP TABLE btc_cap")
    op.execute("DROP TABLE buy_orders")
    op.execute("DROP FUNCTION buy_orders_append_only()")
