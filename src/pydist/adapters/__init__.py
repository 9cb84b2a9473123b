"""Adapters: the database, the broker and the price feed, around the pure domain."""
