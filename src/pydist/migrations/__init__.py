"""Alembic migrations, one history per database: `write` (source of truth) and `read` (projection)."""
