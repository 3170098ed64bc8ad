"""`iafactory migrate`, `iafactory verify`, `iafactory db url|start|stop|status`."""

from __future__ import annotations

import subprocess

import psycopg
import typer

from iafactory.cells import service as cell_service
from iafactory.cells.config import DIRECTORY, Cell, cells, directory_cell
from iafactory.cli import CliError, admin_url, app, console, err_console, print_error, print_table, run
from iafactory.config import Settings, get_settings
from iafactory.db import citus, server
from iafactory.db import migrate as migrations
from iafactory.db import verify as verification
from iafactory.db.bootstrap import migrate_and_prepare
from iafactory.db.scope import admin_connect

db_app = typer.Typer(help="Database utilities.", no_args_is_help=True)
app.add_typer(db_app, name="db")
citus_app = typer.Typer(help="Scaling out with Citus.", no_args_is_help=True)
app.add_typer(citus_app, name="citus")


@app.command("migrate")
@run
async def migrate_command(
    version: str | None = typer.Argument(
        None, help="Apply only this migration (e.g. 006); earlier ones must be applied."
    ),
    check: bool = typer.Option(False, "--check", help="Show each migration: applied (when), pending, or changed."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would run; change nothing."),
) -> None:
    """Apply pending SQL migrations in order, under an advisory lock, each recorded with its checksum.
    With IAFACTORY_CELLS, every cell is migrated in turn and records the regions it serves."""
    settings = get_settings()
    configured = cells(settings)  # a bad IAFACTORY_CELLS stops here, before any database is touched
    several = settings.cells is not None
    targets = [directory_cell(), *configured.values()] if several else list(configured.values())
    for cell in targets:
        url = cell_service.admin_url(settings, cell)
        if several and cell.url is not None and not (check or dry_run) and await cell_service.ensure_database(url):
            console.print(f"created database {server.redact(url)}")
        label = f" — {_cell_label(cell)}" if several else ""
        if check or dry_run:
            await _report(url, label, version, check=check, dry_run=dry_run)
            continue
        if several:
            console.print(f"[bold]{_cell_label(cell)}[/bold]: {server.redact(url)}")

        def started(m: migrations.Migration) -> None:
            console.print(f"applying {m.filename} ...", end=" ")

        def done(m: migrations.Migration, ms: int) -> None:
            console.print(f"[green]ok[/green] ({ms} ms)")

        applied = await migrate_and_prepare(
            url,
            cell.settings(settings),
            version,
            on_start=started,
            on_done=done,
            cell=cell if several else None,
        )
        if not applied:
            console.print(f"{version} is already applied." if version else "Database is up to date.")
        if several and cell.url is not None and version is None:
            counts = await cell_service.sync_directory(settings, cell)
            console.print(f"directory: {counts['tenants']} tenants and {counts['logins']} logins of {cell.name}")


def _cell_label(cell: Cell) -> str:
    if cell.name == DIRECTORY:
        return "directory (no tenant data; serves no region)"
    return f"cell {cell.name} ({', '.join(cell.regions)})"


async def _report(url: str, label: str, version: str | None, *, check: bool, dry_run: bool) -> None:
    statuses = await migrations.check(url)
    if check:
        print_table(
            f"Migrations{label}",
            ["version", "name", "state", "applied at", "ms"],
            [
                [
                    s.version,
                    s.name,
                    s.state,
                    s.applied_at and s.applied_at.isoformat(timespec="seconds"),
                    s.execution_ms,
                ]
                for s in statuses
            ],
        )
        for s in statuses:
            if s.state == "changed":
                console.print(f"[yellow]{s.version}_{s.name}.sql changed since it was applied[/yellow]")
            if s.superseded_by_reason:
                console.print(
                    f"{s.version}_{s.name}.sql was applied as an earlier text, accepted as equivalent "
                    f"(superseded_checksums.txt: {s.superseded_by_reason})",
                    highlight=False,
                )
    if dry_run:
        todo = migrations.plan(statuses, version)
        if label:
            console.print(label.removeprefix(" — "))
        if not todo:
            console.print("Nothing to apply.")
        for m in todo:
            mode = "one transaction" if m.transactional else "statement by statement (no transaction)"
            console.print(f"would apply {m.filename}: {len(m.statements())} statements, {mode}")


@app.command("verify")
@run
async def verify_command() -> None:
    """Run the post-migration checks: tenants, tenant_id everywhere, indexes, no NULL tenant_id
    (in every cell, with IAFACTORY_CELLS)."""
    settings = get_settings()
    checks = []
    for cell, url in cell_service.cell_urls(settings):
        async with await admin_connect(url) as conn:
            found = await verification.run_checks(conn)
        where = f"cell {cell.name}: " if settings.cells is not None else ""
        checks += found
        for c in found:
            mark = "[green]PASS[/green]" if c.ok else "[red]FAIL[/red]"
            console.print(f"{mark}  {where}{c.name}: {c.detail}", highlight=False)
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


@db_app.command("url")
def url_command() -> None:
    """Print the admin connection URL (starting the embedded server if needed), e.g. for psql."""
    print(admin_url())


def _embedded_only(settings: Settings, command: str) -> None:
    if settings.database_url:
        print_error(
            f"DATABASE_URL is set: `iafactory db {command}` only manages the embedded PostgreSQL "
            "(unset DATABASE_URL to manage it)"
        )
        raise typer.Exit(1)


@db_app.command("start")
def start_command() -> None:
    """Start the embedded PostgreSQL (or find it running) and print its admin URL.

    It keeps running after this command, as after `demo`, `serve` or the tests: `iafactory db stop` stops it.
    """
    settings = get_settings()
    _embedded_only(settings, "start")
    was_running = server.embedded_status(settings).running
    try:
        url = server.start_embedded(settings)
    except (OSError, RuntimeError, subprocess.SubprocessError, psycopg.Error) as err:
        print_error(
            f"could not start the embedded PostgreSQL in {settings.embedded_dir}: {err} "
            f"(its log: {settings.embedded_dir / 'log'})"
        )
        raise typer.Exit(1) from None
    state = "already running" if was_running else "started"
    err_console.print(f"embedded PostgreSQL {state} in {settings.embedded_dir}", highlight=False, soft_wrap=True)
    print(url)


@db_app.command("stop")
def stop_command() -> None:
    """Stop the embedded PostgreSQL cleanly (the next command that needs it starts it again)."""
    settings = get_settings()
    _embedded_only(settings, "stop")
    try:
        stopped = server.stop_embedded(settings)
    except (OSError, RuntimeError) as err:
        print_error(str(err))
        raise typer.Exit(1) from None
    where = server.embedded_status(settings).data_dir
    print(
        f"stopped the embedded PostgreSQL in {where}"
        if stopped
        else f"the embedded PostgreSQL in {where} was not running"
    )


@db_app.command("status")
def status_command() -> None:
    """Whether the embedded PostgreSQL runs: data directory, URL, version. Exit status 3 when it
    does not run (as `pg_ctl status`), unless DATABASE_URL is set."""
    settings = get_settings()
    if settings.database_url:
        print(
            f"database: {server.redact(settings.database_url)} (DATABASE_URL is set: the embedded server is not used)"
        )
    st = server.embedded_status(settings)
    print(f"embedded PostgreSQL: {f'running (pid {st.pid})' if st.running else 'not running'}")
    print(f"data directory: {st.data_dir}")
    if st.running:
        print(f"URL: {st.url}")
    print(f"version: {st.version or 'none yet (created by the first command that needs it)'}")
    if not st.running and not settings.database_url:
        raise typer.Exit(3)


@citus_app.command("distribute")
@run
async def distribute_command(
    shard_count: int = typer.Option(
        32, "--shard-count", min=1, max=1024, help="Shards of tenants (and of every table colocated with it)."
    ),
) -> None:
    """On a Citus coordinator, after `migrate`: distribute tenants by id and every tenant table by
    tenant_id (colocated), make the other tables reference tables. Idempotent."""
    try:
        await citus.distribute(
            admin_url(), get_settings(), lambda line: console.print(line, highlight=False), shard_count=shard_count
        )
    except citus.CitusError as err:
        raise CliError(str(err)) from err
