"""`iafactory demo`: the first README command. Migrate, load the demo tenants, show the state."""

from __future__ import annotations

import typer

from iafactory.auth.passwords import hash_password
from iafactory.cli import admin_url, app, console, print_table, run
from iafactory.config import get_settings
from iafactory.db import migrate as migrations
from iafactory.db.bootstrap import migrate_and_prepare
from iafactory.db.scope import operator_transaction
from iafactory.tenancy import service
from iafactory.serve import run_server, settings_to_serve
from iafactory.tenancy.demo import DEMO_PASSWORD, DEMO_USERS, load_demo_tenants, load_demo_users
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
    console.print(f"Demo tenants: {created} created.")
    statuses = await migrations.check(url)
    print_table("Migrations", ["version", "name", "state"], [[s.version, s.name, s.state] for s in statuses])
    print_table(
        f"Tenants ({len(tenants)})",
        ["slug", "name", "region", "plan", "status"],
        [[t.slug, t.name, t.region, t.plan, t.status] for t in tenants],
    )
    print_table(
        f"Demo users (password for all: {DEMO_PASSWORD})",
        ["email", "tenants (role)", "platform admin"],
        [[email, ", ".join(f"{slug} ({role})" for slug, role in memberships) or "-", "yes" if admin else ""]
         for email, _, memberships, admin in DEMO_USERS],
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
    console.print(f"\nAPI: http://{host}:{port}/api/v1   docs: http://{host}:{port}/docs   "
                  f"OpenAPI: http://{host}:{port}/openapi.json")
    console.print(f"Try: curl -s -X POST http://{host}:{port}/api/v1/auth/login -H 'content-type: application/json' "
                  f"-d '{{\"email\": \"admin@cabinet-dupont.ch\", \"password\": \"{DEMO_PASSWORD}\"}}'")
    run_server(host, port, 1)
