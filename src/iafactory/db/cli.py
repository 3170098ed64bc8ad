"""`iafactory migrate`, `iafactory verify`, `iafactory db url`."""

from __future__ import annotations

import typer

from iafactory.cli import CliError, admin_url, app, console, print_table, run
from iafactory.config import get_settings
from iafactory.db import citus
from iafactory.db import migrate as migrations
from iafactory.db.bootstrap import migrate_and_prepare
from iafactory.db import verify as verification
from iafactory.db.scope import admin_connect

db_app = typer.Typer(help="Database utilities.", no_args_is_help=True)
app.add_typer(db_app, name="db")
citus_app = typer.Typer(help="Scaling out with Citus.", no_args_is_help=True)
app.add_typer(citus_app, name="citus")


@app.command("migrate")
@run
async def migrate_command(
    version: str | None = typer.Argument(None, help="Apply only this migration (e.g. 006); earlier ones must be applied."),
    check: bool = typer.Option(False, "--check", help="Show each migration: applied (when), pending, or changed."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would run; change nothing."),
) -> None:
    """Apply pending SQL migrations in order, under an advisory lock, each recorded with its checksum."""
    url = admin_url()
    if check or dry_run:
        statuses = await migrations.check(url)
        if check:
            print_table(
                "Migrations",
                ["version", "name", "state", "applied at", "ms"],
                [[s.version, s.name, s.state, s.applied_at and s.applied_at.isoformat(timespec="seconds"),
                  s.execution_ms] for s in statuses],
            )
            for s in statuses:
                if s.state == "changed":
                    console.print(f"[yellow]{s.version}_{s.name}.sql changed since it was applied[/yellow]")
        if dry_run:
            todo = migrations.plan(statuses, version)
            if not todo:
                console.print("Nothing to apply.")
            for m in todo:
                mode = "one transaction" if m.transactional else "statement by statement (no transaction)"
                console.print(f"would apply {m.filename}: {len(m.statements())} statements, {mode}")
        return

    def started(m: migrations.Migration) -> None:
        console.print(f"applying {m.filename} ...", end=" ")

    def done(m: migrations.Migration, ms: int) -> None:
        console.print(f"[green]ok[/green] ({ms} ms)")

    applied = await migrate_and_prepare(url, get_settings(), version, on_start=started, on_done=done)
    if not applied:
        console.print(f"{version} is already applied." if version else "Database is up to date.")


@app.command("verify")
@run
async def verify_command() -> None:
    """Run the post-migration checks: tenants, tenant_id everywhere, indexes, no NULL tenant_id."""
    async with await admin_connect(admin_url()) as conn:
        checks = await verification.run_checks(conn)
    for c in checks:
        mark = "[green]PASS[/green]" if c.ok else "[red]FAIL[/red]"
        console.print(f"{mark}  {c.name}: {c.detail}", highlight=False)
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


@db_app.command("url")
def url_command() -> None:
    """Print the admin connection URL (starting the embedded server if needed), e.g. for psql."""
    print(admin_url())


@citus_app.command("distribute")
@run
async def distribute_command(
    shard_count: int = typer.Option(32, "--shard-count", min=1, max=1024,
                                    help="Shards of tenants (and of every table colocated with it)."),
) -> None:
    """On a Citus coordinator, after `migrate`: distribute tenants by id and every tenant table by
    tenant_id (colocated), make the other tables reference tables. Idempotent."""
    try:
        await citus.distribute(admin_url(), get_settings(), lambda line: console.print(line, highlight=False),
                               shard_count=shard_count)
    except citus.CitusError as err:
        raise CliError(str(err)) from err
