"""`iafactory demo`: the first README command. Migrate, load the demo tenants, show the state.

On the embedded server, unless IAFACTORY_CELLS or DATABASE_URL says otherwise, the demo runs two
region cells so that data residency is visible from the first minute: the embedded default
database is the directory, and two more databases of the same server are the cells `dz` (Algeria)
and `eu` (Switzerland, France, Belgium, Canada). It sets IAFACTORY_CELLS for its own process only,
and prints it for the commands a person runs next.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any
from uuid import UUID, uuid4

import typer

from iafactory.auth.passwords import hash_password
from iafactory.cells import directory
from iafactory.cells import service as cell_service
from iafactory.cells.config import ENV as CELLS_ENV
from iafactory.cells.config import REGIONS, Cell, cells, directory_cell
from iafactory.cli import CliError, app, console, print_error, print_table, run
from iafactory.config import ConfigError, Settings, get_settings
from iafactory.db import migrate as migrations
from iafactory.db import server
from iafactory.db.bootstrap import migrate_everywhere
from iafactory.db.scope import admin_connect, operator_transaction
from iafactory.serve import run_server, settings_to_serve
from iafactory.tenancy import service
from iafactory.tenancy.demo import (
    DEMO_PASSWORD,
    DEMO_TENANTS,
    DEMO_USERS,
    demo_accounts,
    load_demo_tenant,
    load_demo_users,
)
from iafactory.tenancy.schemas import Tenant, TenantFilters

# The demo's two cells on the embedded server: (name, regions), each a database named
# <embedded database>_<name> next to the directory.
DEMO_CELLS: tuple[tuple[str, tuple[str, ...]], ...] = (("dz", ("DZ",)), ("eu", ("CH", "FR", "BE", "CA")))
CONSULTANT = "consultant@iafactory.ch"


def embedded_cells(settings: Settings) -> str | None:
    """IAFACTORY_CELLS for the demo's two cells on the embedded server, or None: the person chose a
    database (DATABASE_URL) or cells (IAFACTORY_CELLS) of their own, or the embedded default
    database holds the tenants of an earlier one-database demo (it cannot become the directory,
    which holds no tenant: that demo goes on as it was)."""
    if settings.cells is not None or settings.database_url is not None:
        return None
    admin = server.start_embedded(settings)
    if asyncio.run(_holds_tenants(admin)):
        return None
    return json.dumps(
        {
            name: {"url": server.with_database(admin, f"{settings.embedded_db_name}_{name}"), "regions": list(regions)}
            for name, regions in DEMO_CELLS
        }
    )


async def _holds_tenants(admin: str) -> bool:
    async with await admin_connect(admin) as conn:
        found = await (await conn.execute("SELECT to_regclass('public.tenants') IS NOT NULL AS x")).fetchone()
        if not found or not found["x"]:
            return False
        cur = await conn.execute(
            "SELECT count(*) AS n FROM public.tenants WHERE id <> %s", (cell_service.SYSTEM_TENANT,)
        )
        row = await cur.fetchone()
        return row is not None and row["n"] > 0


async def _databases(settings: Settings, targets: list[Cell]) -> list[list[Any]]:
    """(name, admin URL, migrations applied, migrations known) of each database."""
    rows = []
    for cell in targets:
        url = cell_service.admin_url(settings, cell)
        statuses = await migrations.check(url)
        rows.append([cell.name, url, sum(s.state == "applied" for s in statuses), len(statuses)])
    return rows


async def _place(settings: Settings, cell: Cell, slugs: list[str]) -> dict[str, UUID]:
    """With cells, directory first: each demo tenant's route (its id, kept if it exists) and the login
    hash of each demo person with an account in `cell`. A demo slug the directory puts in
    another cell is an operator's doing (a move): refused rather than duplicated."""
    ids: dict[str, UUID] = {}
    async with operator_transaction(cell_service.admin_url(settings, directory_cell())) as dtx:
        for data in DEMO_TENANTS:
            if data.slug not in slugs:
                continue
            found = await directory.route(dtx, slug=data.slug)
            if found is not None and found.cell != cell.name:
                raise CliError(f"demo tenant {data.slug} is in cell {found.cell}, not {cell.name}: leaving it there")
            tenant_id = found.tenant_id if found is not None else uuid4()
            if found is None:
                await directory.record_tenant(
                    dtx, directory.Route(tenant_id, data.slug, data.region, cell.name, data.plan, data.status)
                )
            ids[data.slug] = tenant_id
        for email, *_ in demo_accounts(set(slugs)):
            await directory.record_login(dtx, settings, email, cell.name)
    return ids


@run
async def prepare_demo() -> None:
    settings = get_settings()
    configured = cells(settings)
    several = settings.cells is not None
    applied = await migrate_everywhere(settings)  # with cells: the directory, then each cell, then the sync
    console.print(f"Migrations: {len(applied)} applied now.")
    databases = await _databases(
        settings, [directory_cell(), *configured.values()] if several else [*configured.values()]
    )
    password_hash = await hash_password(settings, DEMO_PASSWORD)
    created = 0
    tenants: list[tuple[str, Tenant]] = []
    grants: list[dict[str, Any]] = []
    accounts: dict[str, list[str]] = {}
    for cell in configured.values():
        slugs = [t.slug for t in DEMO_TENANTS if t.region in cell.regions]
        ids = await _place(settings, cell, slugs) if several else {}
        async with operator_transaction(cell_service.admin_url(settings, cell)) as tx:
            for data in DEMO_TENANTS:
                if data.slug in slugs:
                    created += await load_demo_tenant(tx, data, ids.get(data.slug))
            await load_demo_users(tx, password_hash, set(slugs))
            here = await service.list_tenants(tx, TenantFilters())
            # Billable actions (a PME analysis...) need credits: this month's plan grant, once per month.
            grants += [await service.grant_monthly_to(tx, t.id) for t in here if t.slug in slugs]
        tenants += [(cell.name, t) for t in here]
        for email, *_ in demo_accounts(set(slugs)):
            accounts.setdefault(email, []).append(cell.name)
    console.print(f"Demo tenants: {created} created.")
    held = {name: sum(c == name for c, _ in tenants) for name in [r[0] for r in databases]}
    served = {cell.name: ", ".join(cell.regions) if cell.regions != REGIONS else "all" for cell in configured.values()}
    print_table(
        "Databases"
        + (": the directory (routing only, no tenant data) and one cell per region group" if several else ""),
        ["database", "regions", "tenants", "migrations applied", "URL"],
        [
            [name, served.get(name, "none (directory)"), held[name], f"{done}/{total}", server.redact(url)]
            for name, url, done, total in databases
        ],
    )
    order = {t.slug: k for k, t in enumerate(DEMO_TENANTS)}
    tenants.sort(key=lambda item: (order.get(item[1].slug, -1), item[1].created_at, str(item[1].id)))
    print_table(
        f"Tenants ({len(tenants)})" + (": each lives in the cell of its region, and nowhere else" if several else ""),
        ["slug", "name", "region", "cell", "plan", "status"],
        [[t.slug, t.name, t.region, cell_name, t.plan, t.status] for cell_name, t in tenants],
    )
    print_table(
        f"Monthly plan credits: {sum(g['granted'] for g in grants)} demo tenants granted now, "
        f"{sum(not g['granted'] for g in grants)} already this month",
        ["slug", "credits", "currency", "balance", "granted"],
        [
            [g["slug"], g["credits"], g["currency"], g["balance"], "now" if g["granted"] else "already this month"]
            for g in grants
        ],
    )
    cell_of = {t.slug: name for name, t in tenants}
    print_table(
        f"Demo users (password for all: {DEMO_PASSWORD})",
        ["email", "tenants (role)", "accounts in", "platform admin"],
        [
            [
                email,
                ", ".join(f"{slug} ({role}{', ' + cell_of[slug] if several else ''})" for slug, role in memberships)
                or "-",
                ", ".join(accounts.get(email, [])),
                "yes" if admin else "",
            ]
            for email, _, memberships, admin in DEMO_USERS
        ],
    )


@app.command("demo")
def demo_command(
    serve: bool = typer.Option(True, "--serve/--no-serve", help="Start the API after loading the demo data."),
    host: str = typer.Option(None, help="Interface (default 127.0.0.1)."),
    port: int = typer.Option(None, help="Port (default 8000)."),
) -> None:
    """Migrate, load demo tenants and users, and run the API: on the embedded PostgreSQL, two region
    cells (dz: Algeria; eu: Switzerland, France, Belgium, Canada) and their directory; with
    DATABASE_URL or IAFACTORY_CELLS, the databases they name."""
    try:
        chosen = get_settings()
    except ConfigError as err:
        print_error(str(err))
        raise typer.Exit(1) from err
    cells_json = embedded_cells(chosen)
    if cells_json is not None:
        os.environ[CELLS_ENV] = cells_json  # this process only (and the API it runs)
        get_settings.cache_clear()
    elif chosen.cells is None and chosen.database_url is None:
        console.print(
            f"The embedded database ({chosen.embedded_dir}) already holds tenants in one database (an "
            "earlier demo?): the demo goes on with it as one database. For the two-cell demo, stop it "
            "(`iafactory db stop`) and start with another IAFACTORY_DATA_DIR.",
            soft_wrap=True,
            highlight=False,
            markup=False,
        )
    if serve:
        settings, host = settings_to_serve(host)  # refuse before writing anything
    prepare_demo()
    if cells_json is not None:
        console.print(
            f"\nTwo region cells on the embedded PostgreSQL. To use them from other commands "
            f"(`iafactory tenants list`, `serve`...):\n  export {CELLS_ENV}='{cells_json}'",
            soft_wrap=True,
            highlight=False,
            markup=False,
        )
    if not serve:
        return
    port = port or settings.port
    # One line each, never wrapped: scripts (scripts/smoke_demo.py) read the address and the credentials.
    console.print(
        f"\nAPI: http://{host}:{port}/api/v1   docs: http://{host}:{port}/docs   "
        f"OpenAPI: http://{host}:{port}/openapi.json   console: http://{host}:{port}/console",
        soft_wrap=True,
        highlight=False,
    )
    login = f"curl -s -X POST http://{host}:{port}/api/v1/auth/login -H 'content-type: application/json' -d "
    console.print(
        f'Try: {login}\'{{"email": "admin@cabinet-dupont.ch", "password": "{DEMO_PASSWORD}"}}\'',
        soft_wrap=True,
        highlight=False,
        markup=False,
    )
    if settings.cells is not None:
        console.print(
            f'Two regions, one sign-in: {login}\'{{"email": "{CONSULTANT}", "password": "{DEMO_PASSWORD}"}}\' '
            'lists tenants of both cells ("cell" of each); POST /api/v1/auth/select-tenant picks one',
            soft_wrap=True,
            highlight=False,
            markup=False,
        )
    if not settings.database_url:
        console.print(
            f"The embedded PostgreSQL ({settings.embedded_dir}) keeps running when the API stops: "
            "`.venv/bin/iafactory db stop` stops it.",
            soft_wrap=True,
            highlight=False,
            markup=False,
        )
    # The demo is read by a person: text logs unless IAFACTORY_LOG_FORMAT says otherwise.
    run_server(host, port, 1, log_format=None if "log_format" in settings.model_fields_set else "text")
