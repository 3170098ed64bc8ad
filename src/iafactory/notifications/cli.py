"""`iafactory outbox list|retry`: what the email senders have done and have still to do, in every
cell (each cell has its own outbox: the emails to its people stay in it)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import typer

from iafactory.cells.service import cell_urls
from iafactory.cli import CliError, app, console, print_table, run
from iafactory.config import get_settings
from iafactory.db.scope import operator_transaction
from iafactory.notifications import outbox

outbox_app = typer.Typer(help="The email outbox: messages waiting, sent or failed.", no_args_is_help=True)
app.add_typer(outbox_app, name="outbox")


def _when(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value else ""


@outbox_app.command("list")
@run
async def list_command(
    pending: bool = typer.Option(False, "--pending", help="Only messages still to be sent (or being sent)."),
    failed: bool = typer.Option(False, "--failed", help="Only messages that failed for good."),
    limit: int = typer.Option(100, "--limit", min=1, help="At most this many per cell, newest first."),
    as_json: bool = typer.Option(False, "--json", help="One JSON array instead of a table."),
) -> None:
    """The messages of every cell's outbox (never their bodies), newest first."""
    if pending and failed:
        raise CliError("--pending and --failed: choose one")
    state = "pending" if pending else "failed" if failed else None
    rows: list[dict[str, Any]] = []
    for cell, url in cell_urls(get_settings()):
        async with operator_transaction(url) as tx:
            rows += [{"cell": cell.name, **row} for row in await outbox.list_messages(tx, state, limit)]
    if as_json:
        console.print_json(json.dumps(rows, default=str))
        return
    print_table(
        f"{len(rows)} message(s)",
        ["cell", "id", "to", "kind", "lang", "status", "attempts", "created", "next attempt", "sent", "last error"],
        [
            [
                r["cell"],
                r["id"],
                r["to_address"],
                r["kind"],
                r["language"],
                r["status"],
                r["attempts"],
                _when(r["created_at"]),
                _when(r["next_attempt_at"]) if r["status"] == "pending" else "",
                _when(r["sent_at"]),
                (r["last_error"] or "")[:120],
            ]
            for r in rows
        ],
    )


@outbox_app.command("retry")
@run
async def retry_command(
    message_id: int | None = typer.Argument(None, metavar="ID", help="The message to send again."),
    all_failed: bool = typer.Option(False, "--all-failed", help="Every failed message (of every cell)."),
    cell_name: str | None = typer.Option(None, "--cell", help="The cell of ID (needed with several cells)."),
) -> None:
    """Send a failed message again (or one delivered to the log, once SMTP is configured), now and
    with a fresh count of attempts; a running sender picks it up at once."""
    if (message_id is None) == (not all_failed):
        raise CliError("give a message ID or --all-failed (not both)")
    cells = cell_urls(get_settings())
    if cell_name is not None:
        cells = [(cell, url) for cell, url in cells if cell.name == cell_name]
        if not cells:
            raise CliError(f"--cell: no cell named {cell_name!r}")
    elif message_id is not None and len(cells) > 1:
        raise CliError("--cell: each cell numbers its messages, so name the cell of ID (see `iafactory outbox list`)")
    retried = 0
    for cell, url in cells:
        async with operator_transaction(url) as tx:
            ids = await outbox.retry(tx, message_id)
        retried += len(ids)
        if ids:
            console.print(f"cell {cell.name}: queued again {', '.join(map(str, ids))}")
    if message_id is not None and not retried:
        raise CliError(f"no message {message_id} that failed, went to the log or is waiting")
    if all_failed and not retried:
        console.print("no failed message")
