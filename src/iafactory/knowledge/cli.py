"""`iafactory worker` and `iafactory knowledge ...`."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import psycopg
import typer

from iafactory.app import cell_pools
from iafactory.auth.purge import Retention
from iafactory.cells import service as cell_service
from iafactory.cells.service import cell_urls
from iafactory.cli import CliError, app, console, run
from iafactory.config import get_settings, smtp_problems
from iafactory.db import bootstrap
from iafactory.db.scope import operator_transaction
from iafactory.knowledge import extraction, large, worker
from iafactory.knowledge import files as files_service
from iafactory.knowledge.embeddings import embedder
from iafactory.knowledge.schemas import JOBS_CHANNEL
from iafactory.notifications import sender
from iafactory.observability import logs
from iafactory.tenancy import service as tenancy_service
from iafactory.tenancy.context import TenantContext

knowledge_app = typer.Typer(help="Knowledge-base indexing.", no_args_is_help=True)
app.add_typer(knowledge_app, name="knowledge")


@app.command("worker")
@run
async def worker_command(
    once: bool = typer.Option(False, "--once", help="Run the queued jobs, then exit."),
) -> None:
    """Index knowledge-base documents and send the outbox's emails in the background (several
    workers may run at once)."""
    settings = get_settings()
    if problems := smtp_problems(settings):
        raise CliError("; ".join(problems))
    pools = cell_pools(settings)  # with IAFACTORY_CELLS, one queue per cell: this worker serves them all
    await pools.open()
    try:
        # One embedding thread per worker process unless configured: throughput comes from running
        # one worker per core (README, "Indexing workers").
        model = embedder(settings, default_threads=1)
        mail = sender.mailer(settings)
        if once:
            done = sent = 0
            for db in pools.dbs.values():
                done += await worker.drain(db, model, lease_seconds=settings.worker_lease_seconds)
                sent += await sender.drain(db, mail, lease_seconds=settings.worker_lease_seconds)
            console.print(f"ran {done} job(s)")
            console.print(f"handled {sent} email(s)")
            return
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # A stop interrupts the job in hand and gives it back to the queue (not counted as an attempt).
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        console.print(f"worker started (embedder: {model.model_id or 'none'}); Ctrl-C to stop")
        # A long-running service like `serve`: its lines in the same format (JSON by default).
        logs.configure(settings.log_format, settings.log_level)
        await asyncio.gather(
            *(
                worker.run_forever(
                    db, model, stop, lease_seconds=settings.worker_lease_seconds, retention=Retention.of(settings)
                )
                for db in pools.dbs.values()
            ),
            *(
                sender.run_forever(db, mail, stop, lease_seconds=settings.worker_lease_seconds)
                for db in pools.dbs.values()
            ),
        )
    finally:
        await pools.close()


@knowledge_app.command("reembed")
@run
async def reembed_command(
    all_chunks: bool = typer.Option(
        False, "--all", help="Re-embed every document, not only those embedded with another model."
    ),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Run the jobs here, with progress."),
) -> None:
    """Queue re-embedding with the configured model (e.g. after changing IAFACTORY_EMBEDDING_*)."""
    settings = get_settings()
    model = embedder(settings)
    queued_by_cell: list[tuple[str, int]] = []
    for _, url in cell_urls(settings):  # each cell queues and runs its own tenants' jobs
        queued_by_cell.append((url, await _queue_reembedding(url, all_chunks, model.model_id)))
    queued = sum(n for _, n in queued_by_cell)
    console.print(f"queued {queued} document(s) for re-embedding with {model.model_id or 'no model'}")
    if not wait or not queued:
        return
    from rich.progress import Progress

    with Progress(console=console) as bar:
        task = bar.add_task("re-embedding", total=queued)
        for url, n in queued_by_cell:
            if not n:
                continue
            async with bootstrap.database(settings, url) as db:
                while await worker.run_one(db, model):
                    bar.advance(task)


async def _queue_reembedding(url: str, all_chunks: bool, model_id: str | None) -> int:
    async with operator_transaction(url) as tx:
        # Which documents, across tenants (an operator's read); then one tenant's jobs per
        # statement, as plain VALUES (not INSERT ... SELECT into a table with row security).
        stale = await tx.fetch(
            """SELECT DISTINCT d.tenant_id, d.id FROM knowledge_base d
               LEFT JOIN knowledge_chunks c ON c.tenant_id = d.tenant_id AND c.document_id = d.id
               WHERE %s OR c.embedding_model IS DISTINCT FROM %s
               ORDER BY d.tenant_id, d.id""",
            (all_chunks, model_id),
        )
        by_tenant: dict[Any, list[int]] = {}
        for row in stale:
            by_tenant.setdefault(row["tenant_id"], []).append(row["id"])
        for tenant_id, documents in by_tenant.items():
            for start in range(0, len(documents), 500):
                chunk = documents[start : start + 500]
                await tx.execute(
                    "INSERT INTO knowledge_jobs (tenant_id, document_id, kind) VALUES "
                    + ", ".join(["(%s, %s, 'reembed')"] * len(chunk)),
                    [value for document in chunk for value in (tenant_id, document)],
                )
        if stale:
            await tx.execute("SELECT pg_notify(%s, '')", (JOBS_CHANNEL,))  # running workers start at once
    return len(stale)


def _files_to_import(paths: list[Path]) -> list[Path]:
    """Each file named, and the files of each folder (recursively) whose extension is a type we
    take (.pdf, .docx, .html, .htm, .md, .markdown, .txt, .text), in name order."""
    found: list[Path] = []
    for path in paths:
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(
                sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in extraction.EXTENSIONS)
            )
        else:
            raise CliError(f"{path}: no such file or folder")
    return found


@knowledge_app.command("import")
@run
async def import_command(
    slug: str = typer.Argument(..., help="The tenant whose knowledge base receives the files."),
    paths: list[Path] = typer.Argument(..., help="Files, or folders read recursively for the types it takes."),
) -> None:
    """Upload files (PDF, DOCX, HTML, Markdown, text) into a tenant's knowledge base, as the API's
    POST /knowledge-base/files does (same checks, same limits); the worker indexes them."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    settings = get_settings()
    files = _files_to_import(paths)
    if not files:
        raise CliError("no file to import (folders are searched for " + ", ".join(extraction.EXTENSIONS) + ")")
    url = await cell_service.tenant_admin_url(settings, slug)
    async with operator_transaction(url) as tx:
        tenant = await tenancy_service.get_tenant(tx, slug=slug)
        # The tenant's max_file_bytes (plan or override) within the platform's ceiling, as the API's.
        limit = await files_service.file_limit(tx, tenant.id, settings.kb_max_file_bytes)
    ctx = TenantContext(tenant_id=tenant.id)
    imported: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    async with bootstrap.database(settings, url) as db:
        with Progress(
            TextColumn("{task.description:<32.32}"), BarColumn(), MofNCompleteColumn(), console=console
        ) as bar:
            task = bar.add_task("importing", total=len(files))
            for path in files:
                bar.update(task, description=path.name)
                reason = await _import_one(db, ctx, limit, path)
                if reason is None:
                    imported.append(path)
                else:
                    skipped.append((path, reason))
                bar.advance(task)
    console.print(f"imported {len(imported)} file(s) into {slug}; skipped {len(skipped)}")
    for path, reason in skipped:
        console.print(f"  skipped {path}: {reason}", markup=False, highlight=False)
    if imported:
        console.print("the worker indexes them (`iafactory worker`, or the one `iafactory serve` runs)")


async def _import_one(db: Any, ctx: TenantContext, limit: files_service.FileLimit, path: Path) -> str | None:
    """None when stored, else why it was skipped."""
    try:
        data = await anyio.Path(path).read_bytes()
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    try:
        media_type = await anyio.to_thread.run_sync(files_service.inspect, data, path.name, None, limit)
    except files_service.FileRefused as err:
        return str(err)
    try:
        async with db.tenant(ctx) as tx:
            await files_service.store(tx, ctx.tenant_id, filename=path.name, media_type=media_type, data=data)
    except psycopg.Error as err:
        # The plan's storage limit, mostly: the database's own sentence.
        return (err.diag.message_primary or str(err)).strip()
    return None


async def _reconcile_showing_builds(url: str, settings: Any, report: Any) -> list[large.Action]:
    """large.reconcile() with a bar per index being built, from PostgreSQL's own progress report
    (blocks of the table read, then tuples sorted or validated, by phase)."""
    from rich.progress import BarColumn, Progress, TaskID, TextColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[counts]}"), console=console
    ) as bars:
        shown: dict[str, TaskID] = {}

        def show(builds: list[dict]) -> None:
            for build in builds:
                unit = "blocks" if build["blocks_total"] else "tuples"
                done, total = build[f"{unit}_done"], build[f"{unit}_total"]
                counts = f"{done:,} / {total:,} {unit}" if total else ""
                description = f"{build['index']}: {build['phase']}"
                if build["index"] not in shown:
                    shown[build["index"]] = bars.add_task(description, total=None, counts=counts)
                bars.update(
                    shown[build["index"]], description=description, completed=done, total=total or None, counts=counts
                )
            for name in set(shown) - {build["index"] for build in builds}:
                bars.remove_task(shown.pop(name))

        watcher = asyncio.create_task(large.watch_builds(url, show))
        try:
            return await large.reconcile(url, settings, report=report)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, psycopg.Error):
                await watcher  # the bars are a view: a lost watcher connection changes nothing


@knowledge_app.command("index-large")
@run
async def index_large_command(
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be built or dropped, change nothing."),
) -> None:
    """Give large tenants search indexes of their own, built without blocking writes (run it
    from cron or a timer; a second run finds nothing to do): a keyword (GIN) index from
    IAFACTORY_KNOWLEDGE_KEYWORD_INDEX_MIN_CHUNKS passages (default 5,000), an approximate vector
    (HNSW) index from IAFACTORY_KNOWLEDGE_VECTOR_INDEX_MIN_CHUNKS (default 20,000); dropped again
    below half. A vector index built with other parameters (an earlier version's) or for another
    model is replaced: built beside it, then swapped in, so searches never lose it. In a
    terminal, a bar per index being built shows PostgreSQL's own progress report."""
    settings = get_settings()

    def report(action: large.Action) -> None:
        console.print(
            f"{action.verb} {action.kind} index {action.index} ({action.reason})"
            + (f" in {action.seconds:.1f} s" if action.seconds else "")
        )

    total = 0
    for _, url in cell_urls(settings):
        if dry_run or not console.is_terminal:
            actions = await large.reconcile(url, settings, dry_run=dry_run, report=None if dry_run else report)
        else:
            actions = await _reconcile_showing_builds(url, settings, report)
        if dry_run:
            for action in actions:
                console.print(f"would {action.verb} {action.kind} index {action.index} ({action.reason})")
        total += len(actions)
    if not total:
        console.print("nothing to do: every large tenant has its indexes")
