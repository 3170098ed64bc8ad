"""`iafactory tenants ...`: operator commands for tenants and their members."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any
from uuid import uuid4

import typer
from pydantic import TypeAdapter, ValidationError

from iafactory.auth import policy as password_policy
from iafactory.auth.passwords import hash_password
from iafactory.auth.schemas import NewPassword
from iafactory.cells import directory
from iafactory.cells import service as cell_service
from iafactory.cells.config import Cell, cell_for_region, cells, directory_cell
from iafactory.cli import CliError, app, console, parse_json_option, print_table, run
from iafactory.config import Settings, get_settings
from iafactory.db.scope import operator_transaction
from iafactory.emails import Email
from iafactory.tenancy import data_rights, invitations, portability, service
from iafactory.tenancy.context import TenantContext
from iafactory.tenancy.schemas import Plan, Region, Role, Status, Tenant, TenantCreate, TenantFilters

tenants_app = typer.Typer(help="Create and list tenants, manage their members.", no_args_is_help=True)
app.add_typer(tenants_app, name="tenants")


@tenants_app.command("create")
@run
async def create_command(
    name: str = typer.Option(..., help="Display name, e.g. 'Cabinet Dr. Dupont Genève'."),
    slug: str = typer.Option(..., help="URL-safe identifier: lowercase letters, digits and single dashes."),
    region: str = typer.Option(..., help="Where the tenant's data lives: DZ, CH, FR, BE or CA."),
    plan: str = typer.Option("free", help="free, pro or enterprise."),
    status: str = typer.Option("trial", help="active, suspended, trial or cancelled."),
    admin_email: str | None = typer.Option(None, help="The tenant's administrative contact."),
    admin_phone: str | None = typer.Option(None, help="Phone of the administrative contact."),
    metadata: str | None = typer.Option(None, help='JSON object, e.g. \'{"type": "school"}\'.'),
    settings: str | None = typer.Option(None, help="JSON object of tenant settings (plan overrides...)."),
    trial_ends_at: str | None = typer.Option(None, help="ISO 8601 date-time with zone, e.g. 2027-01-31T23:59:59Z."),
) -> None:
    """Create a tenant. Invalid input is refused before anything is written."""
    data = TenantCreate.model_validate(
        {
            "name": name,
            "slug": slug,
            "region": region,
            "plan": plan,
            "status": status,
            "admin_email": admin_email,
            "admin_phone": admin_phone,
            "metadata": parse_json_option("metadata", metadata),
            "settings": parse_json_option("settings", settings),
            "trial_ends_at": trial_ends_at,
        }
    )
    config = get_settings()
    all_cells = cells(config)
    cell = cell_for_region(all_cells, data.region)
    several = config.cells is not None
    links: list[str] = []
    if several:
        tenant = await _create_in_cell(config, cell, data, links)
    else:
        async with operator_transaction(cell_service.admin_url(config, cell)) as tx:
            tenant = await service.create_tenant(tx, data)
            await _invite_admin(tx, config, cell, tenant, links)
    where = f" (cell {cell.name})" if several else ""
    console.print(
        f"created tenant {tenant.slug} ({tenant.id}) in {tenant.region}{where}, plan {tenant.plan}, {tenant.status}"
    )
    for link in links:
        console.print(f"invited {tenant.admin_email} as owner (email queued); the link: {link}", soft_wrap=True)


async def _invite_admin(tx: Any, settings: Settings, cell: Cell, tenant: Tenant, links: list[str]) -> None:
    """The tenant's admin_email gets an owner invitation, in the transaction that creates the tenant."""
    if tenant.admin_email:
        _, link = await invitations.create_by_platform(tx, settings, tenant.id, cell.name, tenant.admin_email, "owner")
        links.append(link)


async def _create_in_cell(settings: Settings, cell: Cell, data: TenantCreate, links: list[str]) -> Tenant:
    """Directory first (a slug names one tenant across cells there), then the tenant's cell; a
    refusal by the cell takes the directory row back."""
    tenant_id = uuid4()
    route = directory.Route(tenant_id, data.slug, data.region, cell.name, data.plan, data.status)
    try:
        async with (
            directory.reserved(lambda: operator_transaction(_directory_url(settings)), route),
            operator_transaction(cell_service.admin_url(settings, cell)) as tx,
        ):
            tenant = await service.create_tenant(tx, data, tenant_id=tenant_id)
            await _invite_admin(tx, settings, cell, tenant, links)
            return tenant
    except directory.DirectoryError as err:
        raise CliError(str(err)) from err


def _directory_url(settings: Settings) -> str:
    return cell_service.admin_url(settings, directory_cell())


async def _register_in_directory(settings: Settings, slug: str) -> None:
    """After an import: the directory routes the tenant to the cell that now holds it."""
    cell, tenant = await cell_service.find_tenant(settings, slug, fan_out=True)
    async with operator_transaction(_directory_url(settings)) as dtx:
        await directory.record_tenant(
            dtx, directory.Route(tenant.id, tenant.slug, tenant.region, cell.name, tenant.plan, tenant.status)
        )


@tenants_app.command("list")
@run
async def list_command(
    region: str | None = typer.Option(None, help="Only this region (DZ, CH, FR, BE, CA)."),
    plan: str | None = typer.Option(None, help="Only this plan."),
    status: str | None = typer.Option(None, help="Only this status."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line instead of a table."),
) -> None:
    """List tenants, optionally filtered."""
    filters = TenantFilters.model_validate({"region": region, "plan": plan, "status": status})
    settings = get_settings()
    found: list[tuple[str, Tenant]] = []
    placed: dict[Any, str] | None = None
    if settings.cells is not None:
        # The directory says which tenants exist and where; each cell holds their details.
        async with operator_transaction(_directory_url(settings)) as dtx:
            placed = {r["tenant_id"]: r["cell"] for r in await directory.routes(dtx, filters, limit=1_000_000)}
    for cell in cells(settings).values():
        if filters.region is not None and filters.region not in cell.regions:
            continue  # the database would refuse such a tenant anyway
        if placed is not None and cell.name not in placed.values():
            continue
        async with operator_transaction(cell_service.admin_url(settings, cell)) as tx:
            found.extend(
                (cell.name, t)
                for t in await service.all_tenants(tx, filters)
                if placed is None or placed.get(t.id) == cell.name
            )
    found.sort(key=lambda item: (item[1].created_at, str(item[1].id)))
    if as_json:
        for cell_name, t in found:
            print(json.dumps({**t.model_dump(mode="json"), "cell": cell_name}, ensure_ascii=False))
        return
    print_table(
        f"Tenants ({len(found)})",
        ["slug", "name", "region", "cell", "plan", "status", "admin email", "id"],
        [[t.slug, t.name, t.region, cell_name, t.plan, t.status, t.admin_email, t.id] for cell_name, t in found],
    )


@tenants_app.command("add-user")
@run
async def add_user_command(
    slug: str = typer.Argument(..., help="The tenant's slug."),
    email: str = typer.Argument(..., help="The person's email."),
    role: str = typer.Option("member", help="owner, admin, member or viewer."),
    name: str = typer.Option("", help="Display name for a new account."),
    password_stdin: bool = typer.Option(
        False,
        "--password-stdin",
        help="Read a password from standard input (one line, at least 10 characters): a new account is created "
        "with it and can sign in at once; an existing account gets it as its new password.",
    ),
) -> None:
    """Add a person to a tenant with a role (or change the role of a member). An email with no account
    (and no --password-stdin) is sent an invitation instead, whose link is printed."""
    try:
        checked_role = TypeAdapter(Role).validate_python(role)
    except ValidationError as err:
        raise CliError(f"--role: must be one of owner, admin, member, viewer (got {role!r})") from err
    try:
        checked_email = TypeAdapter(Email).validate_python(email)
    except ValidationError as err:
        raise CliError(f"EMAIL: {err.errors()[0]['msg'].removeprefix('Value error, ')} (got {email!r})") from err
    password_hash = None
    if password_stdin:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
        try:
            TypeAdapter(NewPassword).validate_python(password)
        except ValidationError as err:
            raise CliError(f"--password-stdin: {err.errors()[0]['msg'].removeprefix('Value error, ').lower()}") from err
        if (reason := password_policy.problem(password, checked_email)) is not None:
            raise CliError(f"--password-stdin: {reason}")
        password_hash = await hash_password(get_settings(), password)
    settings = get_settings()
    url = await _tenant_admin_url(slug)
    if password_hash is None:
        async with operator_transaction(url) as tx:
            tenant = await service.get_tenant(tx, slug=slug)
            if await tx.fetchval("SELECT app.find_user_id(%s)", (checked_email,)) is None:
                # No account: an invitation (the person chooses a name and a password on accepting).
                cell_name = (await cell_service.find_tenant(settings, slug))[0].name if settings.cells else None
                _, link = await invitations.create_by_platform(
                    tx, settings, tenant.id, cell_name or next(iter(cells(settings))), checked_email, checked_role
                )
                console.print(f"invited {checked_email} to {slug} as {checked_role} (email queued); the link:")
                print(link)
                return
    if settings.cells is not None:
        # Directory first: the person signs in through it (a hash of the email, never the email).
        cell, _ = await cell_service.find_tenant(settings, slug)
        async with operator_transaction(_directory_url(settings)) as dtx:
            await directory.record_login(dtx, settings, checked_email, cell.name)
    async with operator_transaction(url) as tx:
        result = await service.add_member(tx, slug, checked_email, checked_role, name=name, password_hash=password_hash)
        if result["user_created"] and password_hash is None:
            # An account created meanwhile was removed again: rolled back with the membership.
            raise CliError(f"{checked_email} has no account yet: run the command again; nothing was changed")
    verb = "created and added" if result["user_created"] else "added"
    note = " (password set)" if password_hash is not None and not result["user_created"] else ""
    console.print(f"{verb} {result['email']} to {slug} as {checked_role}{note}")


# Re-exported for --help texts and tests that enumerate the accepted values.
__all__ = ["Plan", "Region", "Status"]


def _progress_bar():  # a rich Progress and the callback that feeds it
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

    bar = Progress(
        TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(), console=console, transient=False
    )
    tasks: dict[str, TaskID] = {}

    def update(table: str, done: int, total: int) -> None:
        if table not in tasks:
            tasks[table] = bar.add_task(table, total=total)
        bar.update(tasks[table], completed=done, total=total)

    return bar, update


@tenants_app.command("export")
@run
async def export_command(
    slug: str = typer.Argument(..., help="The tenant to export."),
    output: Path = typer.Option(..., "-o", "--output", help="Archive to write (.tar.gz)."),
) -> None:
    """Export every row of a tenant, from every tenant table, into one archive with a manifest."""
    bar, update = _progress_bar()
    with bar:
        manifest = await portability.export_tenant(await _tenant_admin_url(slug), slug, output, update)
    rows = sum(t["rows"] for t in manifest["tables"].values())
    console.print(f"exported {rows} rows from {len(manifest['tables'])} tables to {output}")


@tenants_app.command("erase")
@run
async def erase_command(
    slug: str = typer.Argument(..., help="The tenant whose data is erased."),
    confirm: str = typer.Option(..., "--confirm", help="Repeat the slug to confirm: this cannot be undone."),
    confirmed_request: bool = typer.Option(
        False,
        "--confirmed-request",
        help="Erase only if the tenant asked for it and a platform administrator confirmed the request "
        "(console: Your data; POST /api/v1/tenant/erasure-requests, then "
        "/api/v1/admin/tenants/{id}/erasure-request/confirm); the erasure's note names the request.",
    ),
) -> None:
    """Erase every row of a tenant from every tenant table, in one transaction, and prove it."""
    settings = get_settings()
    admin_url = await _tenant_admin_url(slug)
    reason = None
    if confirmed_request:
        reason = await _confirmed_erasure(admin_url, slug)
    deleted = await portability.erase_tenant(admin_url, slug, confirm, reason=reason)
    if settings.cells is not None:
        async with operator_transaction(_directory_url(settings)) as dtx:
            found = await directory.route(dtx, slug=slug)
            if found is not None:
                await directory.forget_tenant(dtx, found.tenant_id)
    console.print(
        f"erased {sum(deleted.values())} rows of {slug} from {len(deleted)} tables; "
        "verified: no tenant table holds a row of it"
    )


async def _confirmed_erasure(admin_url: str, slug: str) -> str:
    """The note of an erasure a tenant asked for and the platform confirmed (CliError without one)."""
    async with operator_transaction(admin_url) as tx:
        try:
            tenant = await service.get_tenant(tx, slug=slug)
        except service.TenantNotFound as err:
            raise CliError(str(err)) from err
    async with operator_transaction(admin_url, TenantContext(tenant_id=tenant.id)) as tx:
        request = await data_rights.confirmed_request(tx, tenant.id)
    if request is None:
        raise CliError(
            f"{slug} has no confirmed erasure request: its owner asks for erasure (console: Your data), "
            "a platform administrator confirms it; or erase without --confirmed-request"
        )
    return (
        f"erasure request {request['id']} of {request['created_at']:%Y-%m-%d} (user {request['requested_by']}), "
        f"confirmed {request['decided_at']:%Y-%m-%d} by user {request['decided_by']}: {request['reason']}"
    )


@tenants_app.command("import")
@run
async def import_command(
    archive: Path = typer.Argument(..., exists=True, dir_okay=False, help="An archive from `tenants export`."),
    into: str | None = typer.Option(
        None, "--into", help="Copy into a new tenant with this slug (the original may still exist)."
    ),
) -> None:
    """Restore an export into its own, empty tenant, or copy it into a new tenant with --into."""
    bar, update = _progress_bar()
    with bar:
        imported = await portability.import_tenant(
            await _archive_admin_url(archive, into), archive, into, update, get_settings()
        )
    settings = get_settings()
    if settings.cells is not None:
        await _register_in_directory(settings, into or portability.read_archive(archive)[0]["tenant"]["slug"])
    console.print(f"imported {sum(imported.values())} rows into {len(imported)} tables")


async def _tenant_admin_url(slug: str) -> str:
    return await cell_service.tenant_admin_url(get_settings(), slug)


async def _archive_admin_url(archive: Path, into: str | None) -> str:
    """Where an import goes: a restore into the cell that holds the tenant, a copy (--into) into
    the cell serving the exported tenant's region."""
    settings = get_settings()
    all_cells = cells(settings)
    if len(all_cells) == 1:
        return cell_service.admin_url(settings, next(iter(all_cells.values())))
    manifest, _ = portability.read_archive(archive)
    if into is None:
        return await _tenant_admin_url(manifest["tenant"]["slug"])
    cell = cell_for_region(all_cells, manifest["tenant"]["region"])
    async with operator_transaction(_directory_url(settings)) as dtx:
        if await directory.route(dtx, slug=into) is not None:
            raise CliError(f"slug {into!r} is already taken")
    return cell_service.admin_url(settings, cell)


@tenants_app.command("move")
@run
async def move_command(
    slug: str = typer.Argument(..., help="The tenant to move."),
    region: str = typer.Option(..., "--region", help="The region it moves to (DZ, CH, FR, BE, CA): its cell."),
) -> None:
    """Move a tenant to the cell serving another region: read-only meanwhile (writes answer 503),
    copied with the same ids, verified by row counts and SHA-256 checksums, switched in the
    directory, then erased from its old cell with proof. Run it again to resume an interrupted move."""
    from iafactory.cells import move

    try:
        checked = TypeAdapter(Region).validate_python(region)
    except ValidationError as err:
        raise CliError(f"--region: must be one of DZ, CH, FR, BE, CA (got {region!r})") from err
    bar, update = _progress_bar()
    try:
        with bar:
            done = await move.move_tenant(get_settings(), slug, checked, update, say=console.print)
    except move.MoveError as err:
        raise CliError(str(err)) from err
    frozen = (done.unfrozen_at - done.frozen_at).total_seconds() if done.frozen_at and done.unfrozen_at else 0.0
    rows = sum(t["rows"] for t in done.checksums.get("target", {}).values())
    console.print(
        f"moved {slug} from cell {done.from_cell} ({done.from_region}) to cell {done.to_cell} ({done.to_region}): "
        f"{rows} rows, counts and SHA-256 checksums equal; source copy erased; read-only for {frozen:.1f} s"
    )
