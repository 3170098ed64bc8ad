"""`iafactory billing ...`: operator commands for credits."""

from __future__ import annotations

from datetime import date

import typer

from iafactory.cells.service import cell_urls, tenant_admin_url
from iafactory.cli import CliError, app, console, print_table, run
from iafactory.config import get_settings
from iafactory.db.scope import operator_transaction
from iafactory.tenancy import service

billing_app = typer.Typer(help="Credits: monthly plan grants and manual grants.", no_args_is_help=True)
app.add_typer(billing_app, name="billing")


def _month(value: str | None) -> date:
    if value is None:
        return date.today().replace(day=1)
    try:
        year, month = value.split("-")
        return date(int(year), int(month), 1)
    except ValueError as err:
        raise CliError(f"--month: expected YYYY-MM, got {value!r}") from err


@billing_app.command("grant-monthly")
@run
async def grant_monthly_command(
    month: str | None = typer.Option(None, help="YYYY-MM (default: this month)."),
) -> None:
    """Grant each active or trial tenant its plan's monthly credits: once per tenant per month,
    however often this runs (safe for cron)."""
    rows = []
    for _, url in cell_urls(get_settings()):  # every cell grants its own tenants
        async with operator_transaction(url) as tx:
            rows += await service.grant_monthly(tx, _month(month))
    granted = [r for r in rows if r["granted"]]
    print_table(
        f"Monthly grant {_month(month):%Y-%m}: {len(granted)} granted, {len(rows) - len(granted)} already done",
        ["tenant", "credits", "granted now"],
        [[r["slug"], r["credits"], "yes" if r["granted"] else "no (already)"] for r in rows],
    )


@billing_app.command("grant")
@run
async def grant_command(
    slug: str = typer.Argument(..., help="The tenant."),
    amount: int = typer.Argument(..., min=1, help="Credits to add."),
    reason: str = typer.Option(..., help="Why (kept in the ledger and the audit log)."),
    idempotency_key: str = typer.Option(None, "--key", help="Retry-safe key (default: derived from reason)."),
) -> None:
    """Grant credits to one tenant."""
    async with operator_transaction(await tenant_admin_url(get_settings(), slug)) as tx:
        tenant = await service.get_tenant(tx, slug=slug)
        row = await service.grant_credits(tx, tenant.id, amount, reason, idempotency_key or f"cli:{reason}")
    state = "already granted earlier (same key)" if row["duplicate"] else "granted"
    console.print(f"{state}: {slug} balance is now {row['balance']}")
