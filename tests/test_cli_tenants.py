"""`iafactory tenants ...` and `iafactory verify`, run as the installed command against a real,
migrated PostgreSQL database."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from conftest import migrate_sync, run_cli
from iafactory.db import server

# The four tenants of the Phase 1 design document (seed 000, "Créer Vos Premiers Tenants").
SEED_TENANTS = [
    {
        "name": "École Ibn Khaldoun Alger",
        "slug": "ecole-ibn-khaldoun-alger",
        "region": "DZ",
        "plan": "pro",
        "status": "active",
        "admin_email": "admin@ecole-ibn-khaldoun.dz",
        "metadata": {"type": "school", "students_count": 500, "city": "Alger"},
    },
    {
        "name": "Cabinet Dr. Dupont Genève",
        "slug": "cabinet-dupont-geneve",
        "region": "CH",
        "plan": "enterprise",
        "status": "active",
        "admin_email": "admin@cabinet-dupont.ch",
        "metadata": {"type": "medical", "speciality": "general", "city": "Genève"},
    },
    {
        "name": "Étude Maître Martin Lausanne",
        "slug": "etude-martin-lausanne",
        "region": "CH",
        "plan": "pro",
        "status": "active",
        "admin_email": "contact@etude-martin.ch",
        "metadata": {"type": "legal", "speciality": "business_law", "city": "Lausanne"},
    },
    {
        "name": "Fiduciaire Bernard Zurich",
        "slug": "fiduciaire-bernard-zurich",
        "region": "CH",
        "plan": "enterprise",
        "status": "active",
        "admin_email": "info@fiduciaire-bernard.ch",
        "metadata": {"type": "accounting", "clients_count": 120, "city": "Zurich"},
    },
]
# As the document writes it: metadata is a JSON text, passed to the CLI exactly like that.
SEED_METADATA_TEXT = {
    "ecole-ibn-khaldoun-alger": '{"type": "school", "students_count": 500, "city": "Alger"}',
    "cabinet-dupont-geneve": '{"type": "medical", "speciality": "general", "city": "Genève"}',
    "etude-martin-lausanne": '{"type": "legal", "speciality": "business_law", "city": "Lausanne"}',
    "fiduciaire-bernard-zurich": '{"type": "accounting", "clients_count": 120, "city": "Zurich"}',
}


def create_args(t: dict) -> list[str]:
    return [
        "tenants",
        "create",
        "--name",
        t["name"],
        "--slug",
        t["slug"],
        "--region",
        t["region"],
        "--plan",
        t["plan"],
        "--status",
        t["status"],
        "--admin-email",
        t["admin_email"],
        "--metadata",
        SEED_METADATA_TEXT[t["slug"]],
    ]


def fingerprint(url: str) -> dict[str, tuple[int, str]]:
    """Row count and a digest of every row of the tables these commands write."""
    with psycopg.connect(url, autocommit=True) as conn:
        return {
            table: conn.execute(
                f"SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {table} t"
            ).fetchone()
            for table in ("tenants", "users", "tenant_users")
        }


def one_error_line(result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def seeded_db(server_url: str) -> Iterator[str]:
    """A migrated database holding the four seed tenants (created with the CLI) and one member.
    Shared by the tests below, which must not change it (they check that they do not)."""
    name = f"iaf_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = server.with_database(server_url, name)
    try:
        migrate_sync(url)
        for t in SEED_TENANTS:
            result = run_cli(*create_args(t), db_url=url)
            assert result.returncode == 0, result.stderr
        assert (
            run_cli(
                "tenants",
                "add-user",
                "cabinet-dupont-geneve",
                "jean.dupont@cabinet-dupont.ch",
                "--role",
                "owner",
                "--password-stdin",
                db_url=url,
                input="correct horse battery staple\n",
            ).returncode
            == 0
        )
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_create_the_four_seed_tenants_with_the_cli(migrated_db: str) -> None:
    for t in SEED_TENANTS:
        result = run_cli(*create_args(t), db_url=migrated_db)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        assert f"created tenant {t['slug']} (" in result.stdout
        assert f"in {t['region']}, plan {t['plan']}, {t['status']}" in result.stdout
    with psycopg.connect(migrated_db) as conn:
        rows = conn.execute(
            """SELECT name, slug, region, plan, status, admin_email, metadata, admin_phone, settings, trial_ends_at
               FROM tenants WHERE slug <> 'system-default' ORDER BY created_at"""
        ).fetchall()
    assert rows == [
        (t["name"], t["slug"], t["region"], t["plan"], t["status"], t["admin_email"], t["metadata"], None, {}, None)
        for t in SEED_TENANTS
    ]


def test_creating_a_tenant_with_the_cli_is_audited(migrated_db: str) -> None:
    result = run_cli(*create_args(SEED_TENANTS[0]), db_url=migrated_db)
    assert result.returncode == 0, result.stderr
    with psycopg.connect(migrated_db) as conn:
        operator = conn.execute("SELECT session_user").fetchone()[0]
        rows = conn.execute(
            """SELECT e.action, e.actor, e.actor_user_id, e.target_id, e.details, e.ip, e.request_id
               FROM audit_events e JOIN tenants t ON t.id = e.tenant_id WHERE t.slug = %s""",
            (SEED_TENANTS[0]["slug"],),
        ).fetchall()
        tenant_id = conn.execute("SELECT id::text FROM tenants WHERE slug = %s", (SEED_TENANTS[0]["slug"],)).fetchone()[
            0
        ]
    # Who: the operator's database login (no user, no request behind a CLI command). The
    # tenant's admin_email is invited as owner in the same transaction.
    invited = [r for r in rows if r[0] == "invitation.sent"]
    assert [(r[1], r[2], r[4]["email"], r[4]["role"]) for r in invited] == [
        (operator, None, SEED_TENANTS[0]["admin_email"], "owner")
    ]
    assert [r for r in rows if r[0] != "invitation.sent"] == [
        (
            "tenant.created",
            operator,
            None,
            tenant_id,
            {k: SEED_TENANTS[0][k] for k in ("name", "slug", "region", "plan", "status")},
            None,
            None,
        )
    ]


def test_list_region_ch_shows_only_ch_tenants(seeded_db: str) -> None:
    result = run_cli("tenants", "list", "--region", "CH", "--json", db_url=seeded_db)
    assert result.returncode == 0, result.stderr
    listed = [json.loads(line) for line in result.stdout.splitlines()]
    assert {t["region"] for t in listed} == {"CH"}
    assert sorted(t["slug"] for t in listed) == sorted(
        ["system-default"] + [t["slug"] for t in SEED_TENANTS if t["region"] == "CH"]
    )
    by_slug = {t["slug"]: t for t in listed}
    assert by_slug["cabinet-dupont-geneve"]["name"] == "Cabinet Dr. Dupont Genève"
    assert by_slug["cabinet-dupont-geneve"]["metadata"] == SEED_TENANTS[1]["metadata"]
    uuid.UUID(by_slug["etude-martin-lausanne"]["id"])

    dz = run_cli("tenants", "list", "--region", "DZ", "--json", db_url=seeded_db)
    assert [json.loads(line)["slug"] for line in dz.stdout.splitlines()] == ["ecole-ibn-khaldoun-alger"]


def test_add_user_as_admin(migrated_db: str) -> None:
    assert run_cli(*create_args(SEED_TENANTS[0]), db_url=migrated_db).returncode == 0
    result = run_cli(
        "tenants",
        "add-user",
        "ecole-ibn-khaldoun-alger",
        "directeur@ecole-ibn-khaldoun.dz",
        "--role",
        "admin",
        "--password-stdin",
        db_url=migrated_db,
        input="correct horse battery staple\n",
    )
    assert result.returncode == 0, result.stderr
    assert "directeur@ecole-ibn-khaldoun.dz" in result.stdout
    with psycopg.connect(migrated_db) as conn:
        rows = conn.execute(
            """SELECT t.slug, u.email, tu.role FROM tenant_users tu
               JOIN tenants t ON t.id = tu.tenant_id JOIN users u ON u.id = tu.user_id"""
        ).fetchall()
    assert rows == [("ecole-ibn-khaldoun-alger", "directeur@ecole-ibn-khaldoun.dz", "admin")]


BAD_INPUT = [
    pytest.param(
        ["tenants", "create", "--name", "Antenne", "--slug", "antenne", "--region", "US"],
        "--region",
        id="unknown-region",
    ),
    pytest.param(
        ["tenants", "create", "--name", "Autre Dupont", "--slug", "cabinet-dupont-geneve", "--region", "CH"],
        "slug",
        id="duplicate-slug",
    ),
    pytest.param(
        ["tenants", "create", "--name", "X", "--slug", "x", "--region", "CH", "--admin-email", "admin.x.ch"],
        "--admin-email",
        id="malformed-admin-email",
    ),
    pytest.param(
        ["tenants", "create", "--name", "X", "--slug", "x", "--region", "CH", "--metadata", "{type: school}"],
        "--metadata",
        id="malformed-json-metadata",
    ),
    pytest.param(
        ["tenants", "create", "--name", "X", "--slug", "x", "--region", "CH", "--metadata", '["school"]'],
        "--metadata",
        id="json-metadata-not-an-object",
    ),
    pytest.param(
        ["tenants", "create", "--name", "X", "--slug", "x", "--region", "CH", "--plan", "premium"],
        "--plan",
        id="bad-plan",
    ),
    pytest.param(
        ["tenants", "create", "--name", "X", "--slug", "x", "--region", "CH", "--status", "deleted"],
        "--status",
        id="bad-status",
    ),
    pytest.param(
        ["tenants", "create", "--name", "X", "--slug", "Cabinet_Dupont", "--region", "CH"], "--slug", id="bad-slug"
    ),
    pytest.param(
        ["tenants", "add-user", "cabinet-dupont-geneve", "new.member@cabinet-dupont.ch", "--role", "boss"],
        "--role",
        id="bad-role",
    ),
    pytest.param(
        ["tenants", "add-user", "cabinet-dupont-geneve", "not-an-email", "--role", "admin"],
        "EMAIL",
        id="malformed-member-email",
    ),
    pytest.param(
        ["tenants", "add-user", "no-such-tenant", "new.member@cabinet-dupont.ch", "--role", "admin"],
        "slug",
        id="unknown-tenant-slug",
    ),
]


@pytest.mark.parametrize(("args", "field"), BAD_INPUT)
def test_bad_input_is_one_error_line_exit_1_and_writes_nothing(seeded_db: str, args: list[str], field: str) -> None:
    before = fingerprint(seeded_db)
    assert before["tenants"][0] == 5 and before["tenant_users"][0] == 1
    result = run_cli(*args, db_url=seeded_db)
    assert result.returncode == 1
    line = one_error_line(result)
    assert field in line
    assert result.stdout == ""
    assert fingerprint(seeded_db) == before


def test_verify_passes_on_a_migrated_database(migrated_db: str) -> None:
    result = run_cli("verify", db_url=migrated_db)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) >= 7
    assert all(line.startswith("PASS") for line in lines), result.stdout


def test_verify_fails_on_a_database_migrated_only_to_005(empty_db: str) -> None:
    for v in ("001", "002", "003", "004", "005"):
        migrate_sync(empty_db, v)
    result = run_cli("verify", db_url=empty_db)
    assert result.returncode == 1
    fails = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert fails, result.stdout
    assert any("migrations applied" in line and "006 (pending)" in line for line in fails), result.stdout
    assert any("tenants" in line for line in fails), result.stdout


def test_add_user_needs_a_password_for_a_new_account_and_reads_it_from_stdin(migrated_db: str) -> None:
    """An email with no account is sent an invitation (the link is printed; no account is created).
    With --password-stdin the password works at once; for an existing account it becomes the new one."""
    import asyncio

    from conftest import settings_for
    from iafactory.auth.passwords import verify_password

    assert run_cli(*create_args(SEED_TENANTS[0]), db_url=migrated_db).returncode == 0
    slug, email = "ecole-ibn-khaldoun-alger", "secretaire@ecole-ibn-khaldoun.dz"
    invited = run_cli("tenants", "add-user", slug, email, db_url=migrated_db)
    assert invited.returncode == 0 and f"invited {email} to {slug} as member" in invited.stdout, invited.stderr
    assert "/accept-invitation?token=inv_default_" in invited.stdout
    with psycopg.connect(migrated_db) as conn:
        assert conn.execute("SELECT count(*) FROM users WHERE email = %s", (email,)).fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM invitations WHERE email = %s", (email,)).fetchone()[0] == 1
    before = fingerprint(migrated_db)
    short = run_cli("tenants", "add-user", slug, email, "--password-stdin", db_url=migrated_db, input="short\n")
    assert one_error_line(short) == "error: --password-stdin: string should have at least 10 characters"
    for weak in ("aaaaaaaaaa", "1234567890", " " * 10, email):  # the password policy, as over HTTP
        refused = run_cli("tenants", "add-user", slug, email, "--password-stdin", db_url=migrated_db, input=f"{weak}\n")
        assert one_error_line(refused).startswith("error: --password-stdin: "), refused
    assert fingerprint(migrated_db) == before

    def stored_hash() -> str:
        with psycopg.connect(migrated_db) as conn:
            return conn.execute("SELECT password_hash FROM users WHERE email = %s", (email,)).fetchone()[0]

    made = run_cli(
        "tenants", "add-user", slug, email, "--password-stdin", db_url=migrated_db, input="Alger 2026 rentrée\n"
    )
    assert made.returncode == 0 and f"created and added {email} to {slug} as member" in made.stdout, made.stderr
    settings = settings_for(migrated_db)
    assert asyncio.run(verify_password(settings, stored_hash(), "Alger 2026 rentrée"))
    # An existing account joins another role without --password-stdin; with it, the password changes.
    again = run_cli("tenants", "add-user", slug, email, "--role", "admin", db_url=migrated_db)
    assert again.returncode == 0 and "added" in again.stdout and "created" not in again.stdout
    reset = run_cli(
        "tenants", "add-user", slug, email, "--password-stdin", db_url=migrated_db, input="un nouveau mot de passe\n"
    )
    assert reset.returncode == 0 and "(password set)" in reset.stdout, reset.stderr
    assert not asyncio.run(verify_password(settings, stored_hash(), "Alger 2026 rentrée"))
    assert asyncio.run(verify_password(settings, stored_hash(), "un nouveau mot de passe"))
