"""SQL both histories use for least-privilege roles (cluster-wide roles, per-database ACLs)."""

from __future__ import annotations

from collections.abc import Sequence


def ensure_roles(names: Sequence[str]) -> str:
    """Create each NOLOGIN role if missing. Migrations of other databases may race to create the
    same role: the loser's error is swallowed. Existing roles are never altered (an operator's
    LOGIN and password survive)."""
    listed = ", ".join(f"'{n}'" for n in names)
    return f"""
DO $roles$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY[{listed}] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- created meanwhile by a migration of another database
            END;
        END IF;
    END LOOP;
END
$roles$
"""


def schema_usage(roles: Sequence[str], *, grant: bool = True) -> str:
    verb, prep = ("GRANT", "TO") if grant else ("REVOKE", "FROM")
    return (
        f"DO $usage$ BEGIN EXECUTE format('{verb} USAGE ON SCHEMA %I {prep} {', '.join(roles)}', "
        "current_schema()); END $usage$"
    )


def connect_only(roles: Sequence[str]) -> str:
    """This database's own ACL (not cluster configuration): only `roles` (plus superusers and the
    owner) may connect, and nobody else may create temporary tables."""
    names = ", ".join(roles)
    return f"""
DO $acl$
BEGIN
    EXECUTE format('REVOKE CONNECT, TEMPORARY ON DATABASE %I FROM PUBLIC', current_database());
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO {names}', current_database());
END
$acl$
"""


def connect_public(roles: Sequence[str]) -> str:
    """Undo connect_only()."""
    names = ", ".join(roles)
    return f"""
DO $acl$
BEGIN
    EXECUTE format('REVOKE CONNECT ON DATABASE %I FROM {names}', current_database());
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO PUBLIC', current_database());
END
$acl$
"""
