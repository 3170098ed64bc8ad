"""Export, erasure and import of a tenant, through the real `iafactory` command, with a row in
every tenant table the catalog knows."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from catalog_rows import TENANT_A, TENANT_B
from conftest import run_cli


def counts(admin_url: str, tenant: object, tables: list[str]) -> dict[str, int]:
    with psycopg.connect(admin_url) as conn:
        return {
            t: conn.execute(
                sql.SQL("SELECT count(*) FROM {} WHERE tenant_id = %s").format(sql.Identifier(t)), (tenant,)
            ).fetchone()[0]
            for t in tables
        }


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
