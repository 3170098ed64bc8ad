"""Tenant isolation, enforced by PostgreSQL itself, checked for every table the catalog knows.

Nothing here lists tables by hand: a table with `tenant_id` added by a later migration is
covered by every test below without anyone remembering to add it.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg import sql

from catalog_rows import TENANT_A, TENANT_B, insert_order, insert_row, pk_where, row_for, set_tenant
from conftest import settings_for


@pytest.fixture(scope="module")
def world(catalog_world: dict[str, Any]) -> dict[str, Any]:
    """This module's tenants A and B with a row in every tenant table (catalog_rows.catalog_world)."""
    return catalog_world


def test_catalog_finds_the_tenant_tables(world: dict[str, Any]) -> None:
    # Guards the generator itself: if discovery broke, every other test would pass vacuously.
    assert {"projects", "knowledge_base", "crm_deals", "api_keys", "tenant_users"} <= set(world["tables"])
    assert len(world["tables"]) >= 15


def test_every_tenant_table_has_forced_rls_and_the_tenant_policy(world: dict[str, Any]) -> None:
    problems = []
    with psycopg.connect(world["admin"]) as conn:
        for table in [*list(world["tables"]), "tenants"]:
            enabled, forced = conn.execute(
                "SELECT relrowsecurity, relforcerowsecurity FROM pg_class WHERE oid = %s::regclass", (table,)
            ).fetchone()
            policies = conn.execute(
                """SELECT polname, polroles::regrole[]::text[], pg_get_expr(polqual, polrelid),
                          pg_get_expr(polwithcheck, polrelid)
                   FROM pg_policy WHERE polrelid = %s::regclass""",
                (table,),
            ).fetchall()
            if not (enabled and forced):
                problems.append(f"{table}: RLS enabled={enabled} forced={forced}")
            column = "id" if table == "tenants" else "tenant_id"
            tenant_policies = [p for p in policies if "current_tenant_id()" in (p[2] or "")]
            # No subquery (019): a distributed table's shards cannot evaluate one.
            if not tenant_policies or any(
                p[2] != f"({column} = app.current_tenant_id())" or p[2] != p[3] for p in tenant_policies
            ):
                problems.append(f"{table}: no tenant policy with matching USING/WITH CHECK: {policies}")
            # Any other policy may only be for the definer role, never for the application.
            for pol in policies:
                if pol not in tenant_policies and pol[1] != ["iaf_owner"]:
                    problems.append(f"{table}: unexpected policy {pol[0]} for {pol[1]}")
    assert not problems, "\n".join(problems)


def test_application_role_is_powerless_outside_rls(world: dict[str, Any]) -> None:
    settings = settings_for(world["admin"])
    with psycopg.connect(world["admin"]) as conn:
        role = conn.execute(
            "SELECT rolsuper, rolbypassrls, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = %s",
            (settings.app_db_user,),
        ).fetchone()
        assert role == (False, False, False, False)
        owned = conn.execute(
            """SELECT count(*) FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner
               WHERE r.rolname IN (%s, 'iaf_app')""",
            (settings.app_db_user,),
        ).fetchone()[0]
        owned += conn.execute(
            """SELECT count(*) FROM pg_proc p JOIN pg_roles r ON r.oid = p.proowner
               WHERE r.rolname IN (%s, 'iaf_app')""",
            (settings.app_db_user,),
        ).fetchone()[0]
        assert owned == 0
        memberships = [
            r[0]
            for r in conn.execute(
                """SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
               JOIN pg_roles u ON u.oid = m.member WHERE u.rolname = %s""",
                (settings.app_db_user,),
            )
        ]
        assert memberships == ["iaf_app"]
        group = conn.execute(
            "SELECT rolsuper, rolbypassrls, rolcanlogin FROM pg_roles WHERE rolname = 'iaf_app'"
        ).fetchone()
        assert group == (False, False, False)
        # Every table in public (tenant tables, tenants, users) is owned by iaf_owner.
        owners = conn.execute(
            """SELECT c.relname, pg_get_userbyid(c.relowner) FROM pg_class c
               WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')
                 AND c.relname <> 'schema_migrations'"""
        ).fetchall()
        assert {o for _, o in owners} == {"iaf_owner"}, owners
    with psycopg.connect(world["app"]) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT * FROM schema_migrations")


def test_other_tenants_rows_are_invisible(world: dict[str, Any]) -> None:
    leaks = []
    with psycopg.connect(world["app"]) as conn:
        for table in world["tables"]:
            with conn.transaction():
                set_tenant(conn, TENANT_A)
                seen = conn.execute(
                    sql.SQL("SELECT DISTINCT tenant_id FROM {}").format(sql.Identifier(table))
                ).fetchall()
                # Even asking for B explicitly returns nothing.
                asked = conn.execute(
                    sql.SQL("SELECT count(*) FROM {} WHERE tenant_id = %s").format(sql.Identifier(table)), (TENANT_B,)
                ).fetchone()[0]
            if seen != [(TENANT_A,)] or asked != 0:
                leaks.append(f"{table}: saw {seen}, asked for B got {asked}")
        with conn.transaction():
            set_tenant(conn, TENANT_A)
            assert conn.execute("SELECT id FROM tenants").fetchall() == [(TENANT_A,)]
    assert not leaks, "\n".join(leaks)


def test_updates_and_deletes_cannot_touch_other_tenants_rows(world: dict[str, Any]) -> None:
    touched = []
    with psycopg.connect(world["app"]) as conn:
        for name, table in world["tables"].items():
            b_row = world["rows"][name][TENANT_B]
            cond, params = pk_where(table, b_row)
            upd = dele = 0
            for statement in ("UPDATE {} SET tenant_id = tenant_id WHERE {}", "DELETE FROM {} WHERE {}"):
                try:
                    with conn.transaction():
                        set_tenant(conn, TENANT_A)
                        n = conn.execute(sql.SQL(statement).format(sql.Identifier(name), cond), params).rowcount
                except psycopg.errors.InsufficientPrivilege:
                    n = 0  # the application may not update or delete this table at all
                if statement.startswith("UPDATE"):
                    upd = n
                else:
                    dele = n
            if upd or dele:
                touched.append(f"{name}: update {upd}, delete {dele}")
        with conn.transaction():
            set_tenant(conn, TENANT_A)
            assert conn.execute("UPDATE tenants SET name = 'pwned' WHERE id = %s", (TENANT_B,)).rowcount == 0
    assert not touched, "\n".join(touched)
    # And B still has every row, unchanged.
    with psycopg.connect(world["app"]) as conn, conn.transaction():
        set_tenant(conn, TENANT_B)
        for name, table in world["tables"].items():
            cond, params = pk_where(table, world["rows"][name][TENANT_B])
            assert (
                conn.execute(
                    sql.SQL("SELECT count(*) FROM {} WHERE {}").format(sql.Identifier(name), cond), params
                ).fetchone()[0]
                == 1
            ), name
        assert conn.execute("SELECT name FROM tenants").fetchone()[0] == "tenant-b"


def test_inserting_a_row_for_another_tenant_is_refused(world: dict[str, Any]) -> None:
    accepted = []
    with psycopg.connect(world["app"]) as conn:
        for name in insert_order(world["tables"]):
            parents = {ref: world["rows"][ref][TENANT_B] for _, ref, _ in world["tables"][name].references}
            values = row_for(world["tables"][name], TENANT_B, parents, world["globals"])
            try:
                with conn.transaction():
                    set_tenant(conn, TENANT_A)
                    insert_row(conn, name, values)
                accepted.append(name)
            except psycopg.errors.InsufficientPrivilege:
                pass
    assert not accepted, f"inserts for another tenant accepted in: {accepted}"


def test_moving_a_row_to_another_tenant_is_refused(world: dict[str, Any]) -> None:
    moved = []
    with psycopg.connect(world["app"]) as conn:
        for name, table in world["tables"].items():
            cond, params = pk_where(table, world["rows"][name][TENANT_A])
            try:
                with conn.transaction():
                    set_tenant(conn, TENANT_A)
                    n = conn.execute(
                        sql.SQL("UPDATE {} SET tenant_id = %s WHERE {}").format(sql.Identifier(name), cond),
                        [TENANT_B, *params],
                    ).rowcount
                moved.append(f"{name}: {n} row(s)")
            except (psycopg.errors.InsufficientPrivilege, psycopg.errors.ForeignKeyViolation):
                pass
    assert not moved, "\n".join(moved)


def test_without_a_tenant_every_table_is_empty_and_read_only(world: dict[str, Any]) -> None:
    problems = []
    with psycopg.connect(world["app"]) as conn:
        # A transaction that set a tenant first: afterwards the setting reads back as '' (not NULL),
        # which must still mean "no tenant".
        with conn.transaction():
            set_tenant(conn, TENANT_A)
        assert conn.execute("SELECT current_setting('app.tenant_id', true)").fetchone()[0] == ""
        for name, table in world["tables"].items():
            count = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(name))).fetchone()[0]
            cond, params = pk_where(table, world["rows"][name][TENANT_A])
            upd = dele = 0
            for statement in ("UPDATE {} SET tenant_id = tenant_id WHERE {}", "DELETE FROM {} WHERE {}"):
                try:
                    with conn.transaction():
                        n = conn.execute(sql.SQL(statement).format(sql.Identifier(name), cond), params).rowcount
                except psycopg.errors.InsufficientPrivilege:
                    n = 0
                if statement.startswith("UPDATE"):
                    upd = n
                else:
                    dele = n
            if count or upd or dele:
                problems.append(f"{name}: {count} visible, {upd} updated, {dele} deleted")
            parents = {ref: world["rows"][ref][TENANT_A] for _, ref, _ in table.references}
            for explicit in (True, False):
                values = row_for(table, TENANT_A, parents, world["globals"])
                if not explicit:
                    values.pop("tenant_id")
                try:
                    with conn.transaction():
                        insert_row(conn, name, values)
                    problems.append(f"{name}: insert without tenant accepted (explicit tenant_id={explicit})")
                except (psycopg.errors.InsufficientPrivilege, psycopg.errors.NotNullViolation):
                    pass
        assert conn.execute("SELECT count(*) FROM tenants").fetchone()[0] == 0
    assert not problems, "\n".join(problems)


def test_composite_foreign_keys_refuse_cross_tenant_references_even_for_the_owner(world: dict[str, Any]) -> None:
    """With RLS out of the way (admin connection), the keys alone keep references in-tenant."""
    checked = 0
    with psycopg.connect(world["admin"]) as conn:
        for name, table in world["tables"].items():
            for local, ref, _remote in table.references:
                if "tenant_id" not in local or len(local) < 2:
                    continue
                parents = {r: world["rows"][r][TENANT_A] for _, r, _ in table.references}
                parents[ref] = world["rows"][ref][TENANT_B]  # point A's new row at B's parent
                values = row_for(table, TENANT_A, parents, world["globals"])
                values["tenant_id"] = TENANT_A
                with pytest.raises(psycopg.errors.ForeignKeyViolation), conn.transaction():
                    insert_row(conn, name, values)
                checked += 1
    assert checked >= 3  # bolt/bmad workflows → projects, deals → leads at least


def test_definer_functions_are_narrow_and_pinned(world: dict[str, Any]) -> None:
    with psycopg.connect(world["admin"]) as conn:
        rows = conn.execute(
            """SELECT p.oid::regprocedure::text, p.prosecdef, p.proconfig, pg_get_userbyid(p.proowner),
                      has_function_privilege('public', p.oid, 'EXECUTE')
               FROM pg_proc p WHERE p.pronamespace IN ('app'::regnamespace, 'platform'::regnamespace)"""
        ).fetchall()
    definers = [r for r in rows if r[1]]
    assert definers, "expected SECURITY DEFINER functions"
    for sig, _, config, owner, public_exec in definers:
        assert config and any(c.startswith("search_path=") for c in config), f"{sig} has no fixed search_path"
        assert owner == "iaf_owner", sig
        assert not public_exec, f"{sig} is executable by PUBLIC"


def test_platform_functions_refuse_the_application_without_a_platform_admin(world: dict[str, Any]) -> None:
    with psycopg.connect(world["app"]) as conn:
        with pytest.raises(psycopg.Error, match="platform administrators only") as refused:
            conn.execute("SELECT * FROM platform.tenant_list()")
        assert refused.value.sqlstate == "IA403"
    with psycopg.connect(world["admin"]) as conn:
        assert len(conn.execute("SELECT * FROM platform.tenant_list()").fetchall()) >= 3
