-- The naive order transaction, for pgbench: 5 round trips (BEGIN, UPDATE the cap row, INSERT the
-- order, INSERT its outbox row, COMMIT). The cap's CHECK (used_btc <= limit_btc) is the cap check.
-- Run with -M prepared: :id is then bound as a parameter (uuid), as an application driver would.
\set cents random(100, 100000)
BEGIN;
UPDATE btc_cap SET used_btc = used_btc + 0.00001031 WHERE id = 1;
INSERT INTO buy_orders (idempotence_key, currency, currency_amount, btc_rate, btc_amount)
  VALUES (gen_random_uuid(), 'USD', :cents / 100.0, 97000.00, 0.00001031) RETURNING id \gset
INSERT INTO outbox (order_id) VALUES (:id);
END;
