"""pydist: idempotent, race-free, event-driven BTC buy orders."""
