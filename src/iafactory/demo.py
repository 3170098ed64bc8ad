"""`iafactory demo`: the first README command. Migrate, load the demo tenants, show the state."""

from __future__ import annotations

import typer

from iafactory.auth.passwords import hash_password
from iafactory.cli import admin_url, app, console, print_table, run
from iafactory.config import get_settings
from iafactory.db import migrate as migrations
from iafactory.db.bootstrap import migrate_and_prepare
from iafactory.db.scope import operator_transaction
from iafactory.serve import run_server, settings_to_serve
from iafactory.tenancy import service
from iafactory.tenancy.demo import DEMO_PASSWORD, DEMO_TENANTS, DEMO_USERS, load_demo_tenants, load_demo_users
from iafactory.tenancy.schemas import TenantFilters


@run
async def prepare_demo() -> None:
    url = admin_url()
    settings = get_settings()
    applied = await migrate_and_prepare(url, settings)
    console.print(f"Migrations: {len(applied)} applied now.")
    password_hash = await hash_password(settings, DEMO_PASSWORD)
    async with operator_transaction(url) as tx:
        created = await load_demo_tenants(tx)
        await load_demo_users(tx, password_hash)
        tenants = await service.list_tenants(tx, TenantFilters())
        # Billable actions (a PME analysis...) need credits: this month's plan grant, once per month.
        demo_slugs = {t.slug for t in DEMO_TENANTS}
        grants = [await service.grant_monthly_to(tx, t.id) for t in tenants if t.slug in demo_slugs]
    console.print(f"Demo tenants: {created} created.")
    statuses = await migrations.check(url)
    print_table("Migrations", ["version", "name", "state"], [[s.version, s.name, s.state] for s in statuses])
    print_table(
        f"Tenants ({len(tenants)})",
        ["slug", "name", "region", "plan", "status"],
        [[t.slug, t.name, t.region, t.plan, t.status] for t in tenants],
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
    print_table(
        f"Demo users (password for all: {DEMO_PASSWORD})",
        ["email", "tenants (role)", "platform admin"],
        [
            [email, ", ".join(f"{slug} ({role})" for slug, role in memberships) or "-", "yes" if admin else ""]
            for email, _, memberships, admin in DEMO_USERS
        ],
    )


@app.command("demo")
def demo_command(
    serve: bool = typer.Option(True, "--serve/--no-serve", help="Start the API after loading the demo data."),
    host: str = typer.Option(None, help="Interface (default 127.0.0.1)."),
    port: int = typer.Option(None, help="Port (default 8000)."),
) -> None:
    """Migrate, load demo tenants and users, and run the API: everything on the embedded PostgreSQL
    (or DATABASE_URL)."""
    if serve:
        settings, host = settings_to_serve(host)  # refuse before writing anything
    prepare_demo()
    if not serve:
        return
    port = port or settings.port
    # One line each, never wrapped: scripts (scripts/smoke_demo.py) read the address and the credential.
    console.print(
        f"\nAPI: http://{host}:{port}/api/v1   docs: http://{host}:{port}/docs   "
        f"OpenAPI: http://{host}:{port}/openapi.json",
        soft_wrap=True,
        highlight=False,
    )
    console.print(
        f"Try: curl -s -X POST http://{host}:{port}/api/v1/auth/login -H 'content-type: application/json' "
        f'-d \'{{"email": "admin@cabinet-dupont.ch", "password": "{DEMO_PASSWORD}"}}\'',
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
