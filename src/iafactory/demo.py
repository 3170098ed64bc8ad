"""`iafactory demo`: the first README command. Migrate, load the demo tenants, show the state."""

from __future__ import annotations

from iafactory.cli import admin_url, app, console, print_table, run
from iafactory.config import get_settings
from iafactory.db import migrate as migrations
from iafactory.db.bootstrap import migrate_and_prepare
from iafactory.db.scope import operator_transaction
from iafactory.tenancy import service
from iafactory.tenancy.demo import load_demo_tenants
from iafactory.tenancy.schemas import TenantFilters


@app.command("demo")
@run
async def demo_command() -> None:
    """Set up everything on the embedded PostgreSQL (or DATABASE_URL) with demo data."""
    url = admin_url()
    settings = get_settings()
    applied = await migrate_and_prepare(url, settings)
    console.print(f"Migrations: {len(applied)} applied now.")
    async with operator_transaction(url) as tx:
        created = await load_demo_tenants(tx)
        tenants = await service.list_tenants(tx, TenantFilters())
    console.print(f"Demo tenants: {created} created.")
    statuses = await migrations.check(url)
    print_table("Migrations", ["version", "name", "state"], [[s.version, s.name, s.state] for s in statuses])
    print_table(
        f"Tenants ({len(tenants)})",
        ["slug", "name", "region", "plan", "status"],
        [[t.slug, t.name, t.region, t.plan, t.status] for t in tenants],
    )
