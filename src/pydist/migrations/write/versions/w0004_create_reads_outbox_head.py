"""create_buy_order may read the outbox's unpublished head: `created_at` and `published_at` only.

The age of the oldest unpublished event (`pydist_outbox_oldest_unpublished_age_seconds`) and the
backlog are reported by create_buy_order, which writes the outbox, not by the relay, which drains
it: a stopped relay cannot report its own backlog, so the outbox alert has to come from a process
that is still running (WriteStore.status). The role gets the two columns that measurement reads,
not the events themselves.

Revision ID: w0004
Revises: w0003
"""

from alembic import op

revision = "w0004"
down_revision = "w0003"
branch_labels = None
depends_on = None

_COLUMNS = "SELECT (created_at, published_at) ON outbox"


def upgrade() -> None:
    op.execute(f"GRANT {_COLUMNS} TO pydist_create")


def downgrade() -> None:
    op.execute(f"REVOKE {_COLUMNS} FROM pydist_create")
