"""Region cells (issue 12, first part): IAFACTORY_CELLS, every cell migrated with the regions it
serves, a database that refuses a tenant of a region it does not serve — whoever writes it — and the
operator commands placing and finding tenants by cell. Two cells are two real databases."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import psycopg
import pytest

from conftest import TEST_SECRETS, prepare_sync, run_cli
from iafactory.cells import service as cell_service
from iafactory.cells.config import REGIONS, Cell, cells
from iafactory.config import ConfigError, Settings
from iafactory.db.migrate import MigrationError
from iafactory.db.scope import admin_connect


def settings_with(cells_json: object) -> Settings:
    text = cells_json if isinstance(cells_json, str) else json.dumps(cells_json)
    return Settings(database_url="postgresql://x@y/z", cells=text, **TEST_SECRETS)


# --- configuration ---------------------------------------------------------------------------
def test_unset_means_one_default_cell_serving_every_region() -> None:
    [(name, cell)] = cells(Settings(database_url="postgresql://x@y/z", **TEST_SECRETS)).items()
    assert name == "default" and cell.url is None and cell.regions == REGIONS


def test_two_cells_cover_the_regions() -> None:
    found = cells(
        settings_with(
            {
                "dz": {"url": "postgresql://a/dz", "regions": ["DZ"]},
                "eu": {"url": "postgresql://a/eu", "app_url": "postgresql://b/eu", "regions": ["CH", "FR", "BE", "CA"]},
            }
        )
    )
    assert list(found) == ["dz", "eu"]
    assert found["eu"].app_url == "postgresql://b/eu" and found["dz"].regions == ("DZ",)
    eu = found["eu"].settings(Settings(database_url="postgresql://x@y/z", **TEST_SECRETS))
    assert eu.database_url == "postgresql://a/eu" and eu.app_database_url == "postgresql://b/eu"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "must be a JSON object of cells"),
        ({"dz": {"url": "u", "regions": ["DZ"]}}, "no cell serves CH, FR, BE, CA"),
        (
            {"dz": {"url": "u", "regions": ["DZ", "CH"]}, "eu": {"url": "v", "regions": REGIONS[1:]}},
            "CH is served by two",
        ),
        ({"dz": {"url": "u", "regions": ["DZ", "XX"]}}, "unknown region 'XX'"),
        ({"DZ!": {"url": "u", "regions": list(REGIONS)}}, "cell name 'DZ!'"),
        ({"all": {"regions": list(REGIONS)}}, "cell all: url is required"),
        ({"all": {"url": "u", "regions": []}}, "regions must be a non-empty list"),
        ({"all": {"url": "u", "regions": list(REGIONS), "region": "DZ"}}, "unknown key 'region'"),
        ({"all": {"url": "u", "regions": ["DZ", "DZ", "CH", "FR", "BE", "CA"]}}, "listed twice"),
    ],
)
def test_a_bad_configuration_is_one_message_naming_the_variable(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        cells(settings_with(value))
    assert str(err.value).startswith("IAFACTORY_CELLS: ") and message in str(err.value), err.value


# --- the database refuses a tenant of a region the cell does not serve -----------------------
def dz_only(url: str) -> None:
    async def record() -> None:
        async with await admin_connect(url) as conn:
            await cell_service.record_regions(conn, Cell("dz", url, None, ("DZ",)))

    asyncio.run(record())


def create_tenant_sql(conn: psycopg.Connection, slug: str, region: str) -> None:
    conn.execute(
        "SELECT * FROM platform.tenant_create(%s, %s, %s, 'free', 'trial', NULL, NULL, NULL, NULL, NULL)",
        (slug, slug, region),
    )


def test_a_fresh_database_serves_every_region(migrated_db: str) -> None:
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        assert {r for (r,) in conn.execute("SELECT region FROM cell_regions")} == set(REGIONS)
        for region in REGIONS:
            create_tenant_sql(conn, f"t-{region.lower()}", region)


def test_a_cell_refuses_a_foreign_tenant_whoever_writes_it(migrated_db: str) -> None:
    dz_only(migrated_db)
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        assert conn.execute("SELECT region, cell FROM cell_regions").fetchall() == [("DZ", "dz")]
        create_tenant_sql(conn, "ecole-alger", "DZ")
        with pytest.raises(psycopg.errors.CheckViolation, match="region CH is not served by this cell"):
            create_tenant_sql(conn, "cabinet-geneve", "CH")
        # The owner role of every table, writing directly: still refused.
        with conn.transaction():
            conn.execute("SET LOCAL ROLE iaf_owner")
            with pytest.raises(psycopg.errors.CheckViolation):
                conn.execute("INSERT INTO tenants (name, slug, region) VALUES ('Cabinet', 'cabinet-owner', 'FR')")
        # Nor can an existing tenant be relabelled into a foreign region.
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("UPDATE tenants SET region = 'CH' WHERE slug = 'ecole-alger'")
        assert conn.execute("SELECT slug, region FROM tenants").fetchall() == [("ecole-alger", "DZ")]


def test_a_cell_cannot_stop_serving_a_region_it_holds_tenants_of(migrated_db: str) -> None:
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        create_tenant_sql(conn, "cabinet-geneve", "CH")
    with pytest.raises(MigrationError, match=r"cell dz holds tenants of regions it would no longer serve \(1 of CH\)"):
        dz_only(migrated_db)
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        assert {r for (r,) in conn.execute("SELECT region FROM cell_regions")} == set(REGIONS)


# --- the operator commands with two cells ------------------------------------------------------
@pytest.fixture
def two_cells(make_database: Callable[[], str]) -> dict[str, str]:
    dz, eu, directory = make_database(), make_database(), make_database()
    return {"dz": dz, "eu": eu, "directory": directory}


def cells_env(urls: dict[str, str]) -> dict[str, str]:
    return {
        "IAFACTORY_CELLS": json.dumps(
            {
                "dz": {"url": urls["dz"], "regions": ["DZ"]},
                "eu": {"url": urls["eu"], "regions": ["CH", "FR", "BE", "CA"]},
            }
        )
    }


def tenant_slugs(url: str) -> set[str]:
    with psycopg.connect(url, autocommit=True) as conn:
        return {slug for (slug,) in conn.execute("SELECT slug FROM tenants")}


def test_migrate_create_list_and_find_tenants_across_two_cells(two_cells: dict[str, str]) -> None:
    env = cells_env(two_cells)
    migrated = run_cli("migrate", db_url=two_cells["directory"], env=env)
    assert migrated.returncode == 0, migrated.stderr
    assert "cell dz (DZ)" in migrated.stdout and "cell eu (CH, FR, BE, CA)" in migrated.stdout
    for cell, regions in (("dz", {"DZ"}), ("eu", {"CH", "FR", "BE", "CA"})):
        with psycopg.connect(two_cells[cell], autocommit=True) as conn:
            assert {r for (r, c) in conn.execute("SELECT region, cell FROM cell_regions") if c == cell} == regions

    for slug, region in (("ecole-alger", "DZ"), ("cabinet-geneve", "CH"), ("etude-paris", "FR")):
        made = run_cli(
            "tenants",
            "create",
            "--name",
            slug,
            "--slug",
            slug,
            "--region",
            region,
            db_url=two_cells["directory"],
            env=env,
        )
        assert made.returncode == 0, made.stderr
        assert f"in {region} (cell {'dz' if region == 'DZ' else 'eu'})" in made.stdout
    # Migration 006's system tenant (CH) stays in the cell serving CH; the DZ cell dropped it, empty.
    assert tenant_slugs(two_cells["dz"]) == {"ecole-alger"}
    assert tenant_slugs(two_cells["eu"]) == {"system-default", "cabinet-geneve", "etude-paris"}

    # A slug names one tenant across cells.
    taken = run_cli(
        "tenants",
        "create",
        "--name",
        "x",
        "--slug",
        "ecole-alger",
        "--region",
        "CH",
        db_url=two_cells["directory"],
        env=env,
    )
    assert taken.returncode == 1 and taken.stderr.strip() == "error: slug 'ecole-alger' is already taken"
    assert tenant_slugs(two_cells["eu"]) == {"system-default", "cabinet-geneve", "etude-paris"}

    listed = run_cli("tenants", "list", "--json", db_url=two_cells["directory"], env=env)
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert {(r["slug"], r["region"], r["cell"]) for r in rows} == {
        ("system-default", "CH", "eu"),
        ("ecole-alger", "DZ", "dz"),
        ("cabinet-geneve", "CH", "eu"),
        ("etude-paris", "FR", "eu"),
    }
    only_dz = run_cli("tenants", "list", "--json", "--region", "DZ", db_url=two_cells["directory"], env=env)
    assert [json.loads(line)["slug"] for line in only_dz.stdout.splitlines()] == ["ecole-alger"]

    # Commands naming a tenant find its cell: its member is created there and nowhere else.
    added = run_cli(
        "tenants",
        "add-user",
        "ecole-alger",
        "directrice@ecole-alger.dz",
        "--role",
        "owner",
        "--password-stdin",
        db_url=two_cells["directory"],
        env=env,
        input="mot de passe de la directrice\n",
    )
    assert added.returncode == 0, added.stderr
    for cell, expected in (("dz", 1), ("eu", 0)):
        with psycopg.connect(two_cells[cell], autocommit=True) as conn:
            n = conn.execute("SELECT count(*) FROM users WHERE email = 'directrice@ecole-alger.dz'").fetchone()[0]
            assert n == expected, cell
    missing = run_cli("tenants", "add-user", "nobody-here", "a@b.ch", db_url=two_cells["directory"], env=env)
    assert missing.returncode == 1 and "no tenant with slug 'nobody-here'" in missing.stderr

    check = run_cli("migrate", "--check", db_url=two_cells["directory"], env=env)
    assert check.returncode == 0 and "cell dz (DZ)" in check.stdout and "cell eu" in check.stdout, check.stderr


def test_migrating_a_cell_that_holds_a_foreign_region_is_refused(two_cells: dict[str, str]) -> None:
    prepare_sync(two_cells["dz"])  # once a single database serving every region
    with psycopg.connect(two_cells["dz"], autocommit=True) as conn:
        create_tenant_sql(conn, "cabinet-geneve", "CH")
    result = run_cli("migrate", db_url=two_cells["directory"], env=cells_env(two_cells))
    assert result.returncode == 1
    assert "cell dz holds tenants of regions it would no longer serve (1 of CH)" in result.stderr
    with psycopg.connect(two_cells["dz"], autocommit=True) as conn:
        assert {r for (r,) in conn.execute("SELECT region FROM cell_regions")} == set(REGIONS)


def test_a_bad_cells_variable_stops_migrate_before_any_database_is_touched(empty_db: str) -> None:
    result = run_cli("migrate", db_url=empty_db, env={"IAFACTORY_CELLS": '{"dz": {"url": "x", "regions": ["DZ"]}}'})
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == "error: IAFACTORY_CELLS: no cell serves CH, FR, BE, CA (every region needs exactly one)"
    )
    with psycopg.connect(empty_db, autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('public.schema_migrations')").fetchone()[0] is None


def test_operator_commands_over_all_tenants_cover_every_cell(two_cells: dict[str, str]) -> None:
    env = cells_env(two_cells)
    directory = two_cells["directory"]
    assert run_cli("migrate", db_url=directory, env=env).returncode == 0
    for slug, region in (("ecole-oran", "DZ"), ("etude-lyon", "FR")):
        made = run_cli(
            "tenants", "create", "--name", slug, "--slug", slug, "--region", region, db_url=directory, env=env
        )
        assert made.returncode == 0, made.stderr
    granted = run_cli("billing", "grant-monthly", db_url=directory, env=env)
    assert granted.returncode == 0, granted.stderr
    assert "ecole-oran" in granted.stdout and "etude-lyon" in granted.stdout
    one = run_cli("billing", "grant", "ecole-oran", "5", "--reason", "geste", db_url=directory, env=env)
    assert one.returncode == 0 and "ecole-oran balance is now" in one.stdout, one.stderr
    verified = run_cli("verify", db_url=directory, env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "cell dz:" in verified.stdout and "cell eu:" in verified.stdout
    worker = run_cli("worker", "--once", db_url=directory, env=env)
    assert worker.returncode == 0 and "ran 0 job(s)" in worker.stdout, worker.stderr
