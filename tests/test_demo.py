"""`iafactory demo` (what scripts/demo.sh runs), as the installed command on an empty database: the
demo tenants can use a billable feature right away. With two region cells (what demo.sh runs on
the embedded server), each demo tenant lives in the cell of its region and the consultant's one
sign-in reaches tenants of both."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest

from api_support import app_client, cells_json, login, two_cell_client
from conftest import run_cli
from iafactory.tenancy.demo import DEMO_PASSWORD

pytestmark = pytest.mark.anyio

# slug -> (plan's monthly credits, currency of its region)
EXPECTED = {
    "ecole-ibn-khaldoun-alger": (5000, "DZD"),
    "cabinet-dupont-geneve": (100000, "CHF"),
    "etude-martin-lausanne": (5000, "CHF"),
    "fiduciaire-bernard-zurich": (100000, "CHF"),
    "cabinet-lefevre-lyon": (5000, "EUR"),
}


def grant_lines(stdout: str) -> dict[str, list[str]]:
    """The cells of the demo's credit table, by tenant slug."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) == 5 and cells[0] in EXPECTED:
            rows[cells[0]] = cells[1:]
    return rows


async def test_demo_grants_each_demo_tenant_its_monthly_credits_once(empty_db: str) -> None:
    first = run_cli("demo", "--no-serve", db_url=empty_db)
    assert first.returncode == 0, first.stderr
    assert "5 demo tenants granted now" in first.stdout, first.stdout
    assert grant_lines(first.stdout) == {
        slug: [str(credits), currency, str(credits), "now"] for slug, (credits, currency) in EXPECTED.items()
    }, first.stdout

    again = run_cli("demo", "--no-serve", db_url=empty_db)  # idempotent: this month's grant is done
    assert again.returncode == 0, again.stderr
    assert "0 demo tenants granted now, 5 already this month" in again.stdout, again.stdout
    assert grant_lines(again.stdout) == {
        slug: [str(credits), currency, str(credits), "already this month"]
        for slug, (credits, currency) in EXPECTED.items()
    }, again.stdout

    # The same grant as `billing grant-monthly` (one key per tenant and month): the cron adds nothing.
    cron = run_cli("billing", "grant-monthly", db_url=empty_db)
    assert cron.returncode == 0, cron.stderr
    assert {
        slug: cells[-1]
        for slug, cells in (
            (line.strip("│ ").split("│")[0].strip(), [c.strip() for c in line.strip("│ ").split("│")])
            for line in cron.stdout.splitlines()
        )
        if slug in EXPECTED
    } == dict.fromkeys(EXPECTED, "no (already)")

    with psycopg.connect(empty_db) as conn:
        accounts = {
            slug: rest
            for slug, *rest in conn.execute(
                """SELECT t.slug, a.credit_balance, a.currency,
                      (SELECT count(*) FROM credit_transactions c WHERE c.tenant_id = t.id)
               FROM billing_accounts a JOIN tenants t ON t.id = a.tenant_id WHERE t.slug = ANY (%s)""",
                (list(EXPECTED),),
            ).fetchall()
        }
    assert accounts == {slug: [credits, currency, 1] for slug, (credits, currency) in EXPECTED.items()}

    # The demo owner of the school can run a PME analysis (it used to answer 402).
    async with app_client(empty_db) as (client, _, _):
        token = await login(client, "admin@ecole-ibn-khaldoun.dz", DEMO_PASSWORD)
        r = await client.post(
            "/api/v1/pme-analyses", json={"company_name": "Atlas SARL"}, headers={"Authorization": f"Bearer {token}"}
        )
        assert r.status_code == 201, r.text
        r = await client.get("/api/v1/credits/balance", headers={"Authorization": f"Bearer {token}"})
        assert r.json() == {"balance": 5000 - 10, "currency": "DZD"}


def slugs_in(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {slug for (slug,) in conn.execute("SELECT slug FROM tenants")}


async def test_demo_with_two_cells_keeps_each_tenant_in_its_region(make_database: Callable[[], str]) -> None:
    urls = {"directory": make_database(), "dz": make_database(), "eu": make_database()}
    cells = cells_json(urls)  # dz: DZ; eu: CH, FR, BE, CA
    demo = run_cli("demo", "--no-serve", db_url=urls["directory"], env={"IAFACTORY_CELLS": cells})
    assert demo.returncode == 0, demo.stderr
    assert "5 demo tenants granted now" in demo.stdout, demo.stdout

    # Each tenant in the cell of its region and nowhere else; the directory routes, holds no tenant.
    assert slugs_in(urls["dz"]) == {"ecole-ibn-khaldoun-alger"}
    assert slugs_in(urls["eu"]) == {"system-default", *EXPECTED} - {"ecole-ibn-khaldoun-alger"}
    assert slugs_in(urls["directory"]) == set()
    with psycopg.connect(urls["directory"]) as conn:
        routes = dict(conn.execute("SELECT slug, cell FROM directory.tenants").fetchall())
        assert conn.execute("SELECT count(*) FROM users").fetchone() == (0,)
        # One login hash per (person, cell): the consultant and the platform operator have two.
        assert conn.execute("SELECT count(*) FROM directory.logins").fetchone() == (5 + 2 + 2,)
    assert routes == {slug: "dz" if slug.startswith("ecole") else "eu" for slug in {"system-default", *EXPECTED}}

    again = run_cli("demo", "--no-serve", db_url=urls["directory"], env={"IAFACTORY_CELLS": cells})
    assert again.returncode == 0, again.stderr
    assert "Demo tenants: 0 created." in again.stdout and slugs_in(urls["dz"]) == {"ecole-ibn-khaldoun-alger"}

    # The consultant signs in once and gets the tenants of both cells; the school works in its own.
    async with two_cell_client(urls) as (client, _, _):
        r = await client.post(
            "/api/v1/auth/login", json={"email": "consultant@iafactory.ch", "password": DEMO_PASSWORD}
        )
        assert r.status_code == 200, r.text
        assert r.json()["tenant"] is None
        assert {(t["slug"], t["cell"]) for t in r.json()["tenants"]} == {
            ("ecole-ibn-khaldoun-alger", "dz"),
            ("cabinet-dupont-geneve", "eu"),
            ("fiduciaire-bernard-zurich", "eu"),
        }
        token = await login(client, "admin@ecole-ibn-khaldoun.dz", DEMO_PASSWORD)
        r = await client.get("/api/v1/credits/balance", headers={"Authorization": f"Bearer {token}"})
        assert r.json() == {"balance": 5000, "currency": "DZD"}
