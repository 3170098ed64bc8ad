"""Export, erasure and import of a tenant, through the real `iafactory` command, with a row in
every tenant table the catalog knows."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from catalog_rows import TENANT_A, TENANT_B, set_tenant
from conftest import run_cli


def counts(admin_url: str, tenant: object, tables: list[str]) -> dict[str, int]:
    with psycopg.connect(admin_url) as conn:
        return {
            t: conn.execute(
                sql.SQL("SELECT count(*) FROM {} WHERE tenant_id = %s").format(sql.Identifier(t)), (tenant,)
            ).fetchone()[0]
            for t in tables
        }


def rows_of(world: dict[str, Any], tenant: object) -> dict[str, list[dict[str, Any]]]:
    """Every row of `tenant`, table by table, in primary-key order (as JSON, so every column counts)."""
    out = {}
    with psycopg.connect(world["admin"]) as conn:
        for name, table in sorted(world["tables"].items()):
            order = sql.SQL(", ").join(map(sql.Identifier, table.primary_key))
            out[name] = [
                r[0]
                for r in conn.execute(
                    sql.SQL("SELECT row_to_json(t) FROM {} t WHERE tenant_id = %s ORDER BY {}").format(
                        sql.Identifier(name), order
                    ),
                    (tenant,),
                )
            ]
    return out


def every_row_count(admin_url: str, tables: list[str]) -> dict[str, int]:
    """Rows per table, all tenants together, and the tenants and their slugs."""
    with psycopg.connect(admin_url) as conn:
        totals = {
            t: conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(t))).fetchone()[0]
            for t in [*tables, "tenants", "tenant_slugs"]
        }
    return totals


def one_error_line(r: Any) -> bool:
    lines = r.stderr.strip().splitlines()
    return r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:")


def manifest(path: Path) -> dict[str, Any]:
    with tarfile.open(path, "r:gz") as archive:
        return json.loads(archive.extractfile("manifest.json").read())  # type: ignore[union-attr]


def test_export_erase_import_gives_back_the_same_rows(catalog_world: dict[str, Any], tmp_path: Path) -> None:
    admin, tables = catalog_world["admin"], sorted(catalog_world["tables"])
    first, second = tmp_path / "a1.tar.gz", tmp_path / "a2.tar.gz"
    b_before = counts(admin, TENANT_B, tables)

    r = run_cli("tenants", "export", "tenant-a", "-o", str(first), db_url=admin)
    assert r.returncode == 0, r.stderr
    exported = manifest(first)
    assert sorted(exported["tables"]) == tables
    empty = [t for t, meta in exported["tables"].items() if meta["rows"] == 0]
    assert not empty, f"the round trip must cover every table; empty: {empty}"

    r = run_cli("tenants", "erase", "tenant-a", "--confirm", "tenant-a", db_url=admin)
    assert r.returncode == 0, r.stderr
    assert set(counts(admin, TENANT_A, tables).values()) == {0}
    assert counts(admin, TENANT_B, tables) == b_before
    with psycopg.connect(admin) as conn:
        assert conn.execute("SELECT slug FROM tenant_erasures WHERE erased_tenant = %s", (TENANT_A,)).fetchone() == (
            "tenant-a",
        )

    r = run_cli("tenants", "import", str(first), db_url=admin)
    assert r.returncode == 0, r.stderr
    r = run_cli("tenants", "export", "tenant-a", "-o", str(second), db_url=admin)
    assert r.returncode == 0, r.stderr
    again = manifest(second)
    assert {t: m["sha256"] for t, m in again["tables"].items()} == {
        t: m["sha256"] for t, m in exported["tables"].items()
    }
    assert counts(admin, TENANT_B, tables) == b_before


def test_erasure_needs_the_slug_repeated(catalog_world: dict[str, Any]) -> None:
    before = counts(catalog_world["admin"], TENANT_B, sorted(catalog_world["tables"]))
    r = run_cli("tenants", "erase", "tenant-b", "--confirm", "tenant-a", db_url=catalog_world["admin"])
    assert r.returncode == 1 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    assert counts(catalog_world["admin"], TENANT_B, sorted(catalog_world["tables"])) == before


def test_import_refuses_a_tampered_archive_or_a_tenant_that_is_not_empty(
    catalog_world: dict[str, Any], tmp_path: Path
) -> None:
    admin = catalog_world["admin"]
    archive = tmp_path / "b.tar.gz"
    assert run_cli("tenants", "export", "tenant-b", "-o", str(archive), db_url=admin).returncode == 0
    r = run_cli("tenants", "import", str(archive), db_url=admin)
    assert r.returncode == 1 and "not empty" in r.stderr

    tampered = tmp_path / "tampered.tar.gz"
    with tarfile.open(archive, "r:gz") as src, tarfile.open(tampered, "w:gz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()  # type: ignore[union-attr]
            if member.name == "tables/projects.jsonl":
                data = data.replace(b'"name"', b'"name" ', 1)
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    r = run_cli("tenants", "import", str(tampered), db_url=admin)
    assert r.returncode == 1 and "checksum" in r.stderr


def test_import_into_a_new_slug_copies_a_tenant_that_still_exists(
    catalog_world: dict[str, Any], tmp_path: Path
) -> None:
    admin, tables = catalog_world["admin"], sorted(catalog_world["tables"])
    archive = tmp_path / "b.tar.gz"
    original = rows_of(catalog_world, TENANT_B)  # what the export holds
    assert all(original.values()), "the copy must cover every table"
    assert run_cli("tenants", "export", "tenant-b", "-o", str(archive), db_url=admin).returncode == 0
    exported = rows_of(catalog_world, TENANT_B)  # plus the export's own audit row

    r = run_cli("tenants", "import", str(archive), "--into", "tenant-b-copy", db_url=admin)
    assert r.returncode == 0, r.stderr
    with psycopg.connect(admin) as conn:
        found = conn.execute(
            "SELECT t.id, t.region, t.plan, t.status FROM tenants t WHERE t.slug = 'tenant-b-copy'"
        ).fetchone()
        source = conn.execute("SELECT region, plan, status FROM tenants WHERE id = %s", (TENANT_B,)).fetchone()
    assert found is not None and found[1:] == source
    copy_id = found[0]
    assert copy_id not in (TENANT_A, TENANT_B)

    # The original is untouched, row for row.
    assert rows_of(catalog_world, TENANT_B) == exported
    # The copy holds the same rows under its own tenant id: same ids (the keys are per tenant),
    # same balance and ledger (no second debit, no extra audit row from the triggers).
    copied = rows_of(catalog_world, copy_id)
    assert {t: len(v) for t, v in copied.items()} == {t: len(v) for t, v in original.items()}
    for table in tables:
        for mine, theirs in zip(copied[table], original[table], strict=True):
            assert mine["tenant_id"] == str(copy_id)
            if table == "api_keys":
                # A key's prefix is how a presented key finds its tenant: the copy's keys are
                # kept as revoked records that no key can reach.
                assert mine["prefix"] != theirs["prefix"] and mine["revoked_at"] is not None
                mine = {**mine, "prefix": theirs["prefix"], "revoked_at": theirs["revoked_at"]}
            if table == "invitations":
                # Likewise a token finds its invitation by its hash: the copy's invitations are
                # revoked records under a hash no token has.
                assert mine["token_hash"] != theirs["token_hash"]
                assert mine["revoked_at"] is not None or mine["accepted_at"] is not None
                mine = {**mine, "token_hash": theirs["token_hash"], "revoked_at": theirs["revoked_at"]}
            assert {**mine, "tenant_id": str(TENANT_B)} == theirs, table

    with psycopg.connect(catalog_world["app"]) as conn:
        # The original's API keys still lead to the original tenant only.
        for key in original["api_keys"]:
            assert conn.execute("SELECT tenant_id FROM app.authenticate_api_key(%s)", (key["prefix"],)).fetchall() == [
                (TENANT_B,)
            ]
        # Row security: each tenant sees its own rows only, whichever it asks for.
        leaks = []
        for table in tables:
            for me, other, mine in ((copy_id, TENANT_B, copied), (TENANT_B, copy_id, exported)):
                with conn.transaction():
                    set_tenant(conn, me)
                    seen = conn.execute(
                        sql.SQL("SELECT tenant_id, count(*) FROM {} GROUP BY 1").format(sql.Identifier(table))
                    ).fetchall()
                    asked = conn.execute(
                        sql.SQL("SELECT count(*) FROM {} WHERE tenant_id = %s").format(sql.Identifier(table)),
                        (other,),
                    ).fetchone()[0]
                if seen != [(me, len(mine[table]))] or asked:
                    leaks.append(f"{table} as {me}: saw {seen}, asked for {other} got {asked}")
        with conn.transaction():
            set_tenant(conn, copy_id)
            assert conn.execute("SELECT id FROM tenants").fetchall() == [(copy_id,)]
    assert not leaks, "\n".join(leaks)


def test_import_into_a_taken_slug_or_failing_halfway_writes_nothing(
    catalog_world: dict[str, Any], tmp_path: Path
) -> None:
    admin, tables = catalog_world["admin"], sorted(catalog_world["tables"])
    archive = tmp_path / "b.tar.gz"
    assert run_cli("tenants", "export", "tenant-b", "-o", str(archive), db_url=admin).returncode == 0
    before = every_row_count(admin, tables)
    a_before = rows_of(catalog_world, TENANT_A)

    r = run_cli("tenants", "import", str(archive), "--into", "tenant-a", db_url=admin)
    assert one_error_line(r) and "tenant-a" in r.stderr, r.stderr
    assert rows_of(catalog_world, TENANT_A) == a_before
    assert every_row_count(admin, tables) == before

    r = run_cli("tenants", "import", str(archive), "--into", "Not_A_Slug", db_url=admin)
    assert one_error_line(r) and "--into" in r.stderr, r.stderr

    # A copy that fails at its last table (a row of another tenant, checksums made to match)
    # leaves neither the new tenant nor any of the rows written before it.
    last = manifest(archive)["table_order"][-1]
    tampered = tmp_path / "tampered.tar.gz"
    with tarfile.open(archive, "r:gz") as src, tarfile.open(tampered, "w:gz") as dst:
        data = {m.name: src.extractfile(m).read() for m in src.getmembers()}  # type: ignore[union-attr]
        table_file = f"tables/{last}.jsonl"
        data[table_file] = data[table_file].replace(str(TENANT_B).encode(), str(uuid.uuid4()).encode(), 1)
        meta = json.loads(data["manifest.json"])
        meta["tables"][last]["sha256"] = hashlib.sha256(data[table_file]).hexdigest()
        data["manifest.json"] = json.dumps(meta).encode()
        for name, content in data.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            dst.addfile(info, io.BytesIO(content))
    r = run_cli("tenants", "import", str(tampered), "--into", "tenant-b-half", db_url=admin)
    assert one_error_line(r) and "another tenant" in r.stderr, r.stderr
    assert every_row_count(admin, tables) == before
    with psycopg.connect(admin) as conn:
        assert conn.execute("SELECT count(*) FROM tenants WHERE slug = 'tenant-b-half'").fetchone()[0] == 0


def test_erase_with_confirmed_request_needs_the_platforms_confirmation(catalog_world: dict[str, Any]) -> None:
    """`tenants erase --confirmed-request` erases a tenant only once its owner's erasure request
    has been confirmed by a platform administrator (here the operator, through the same
    function), and the erasure's note names the request. Last in this module: it erases tenant-b."""
    admin, tables = catalog_world["admin"], sorted(catalog_world["tables"])
    before = counts(admin, TENANT_B, tables)
    with psycopg.connect(admin) as conn:
        conn.execute("UPDATE erasure_requests SET status = 'cancelled' WHERE tenant_id = %s", (TENANT_B,))
        conn.execute("INSERT INTO erasure_requests (tenant_id, reason) VALUES (%s, 'closing the school')", (TENANT_B,))
    r = run_cli("tenants", "erase", "tenant-b", "--confirm", "tenant-b", "--confirmed-request", db_url=admin)
    assert r.returncode == 1 and "no confirmed erasure request" in r.stderr, r.stderr
    assert counts(admin, TENANT_B, tables) == {**before, "erasure_requests": before["erasure_requests"] + 1}
    with psycopg.connect(admin) as conn:
        confirmed = conn.execute("SELECT * FROM platform.confirm_erasure_request(%s, NULL)", (TENANT_B,)).fetchone()
        assert confirmed is not None and confirmed[1] == "confirmed"
    r = run_cli("tenants", "erase", "tenant-b", "--confirm", "tenant-b", "--confirmed-request", db_url=admin)
    assert r.returncode == 0, r.stderr
    assert set(counts(admin, TENANT_B, tables).values()) == {0}
    with psycopg.connect(admin) as conn:
        (reason,) = conn.execute(
            "SELECT reason FROM tenant_erasures WHERE erased_tenant = %s ORDER BY erased_at DESC LIMIT 1", (TENANT_B,)
        ).fetchone()
    assert reason.startswith(f"erasure request {confirmed[0]} ") and "closing the school" in reason
