"""POST /api/v1/knowledge-base/search, and files: upload, list, download."""

from __future__ import annotations

from typing import Annotated, Any

import anyio.to_thread
from fastapi import File, Form, Path, Query, Request, Response, UploadFile

from iafactory.auth.dependencies import CurrentPrincipal, Viewer, open_tenant_session, tenant_context
from iafactory.http.idempotency import Idempotent
from iafactory.http.problems import Problem, not_found
from iafactory.http.rendering import api_router
from iafactory.knowledge import extraction
from iafactory.knowledge import files as files_service
from iafactory.knowledge import search as search_service
from iafactory.knowledge.embeddings import embedder
from iafactory.knowledge.schemas import FileOut, FileUploadOut, SearchIn, SearchOut
from iafactory.resources import pagination
from iafactory.resources.pagination import DEFAULT_LIMIT, MAX_LIMIT, Page, cursor_param

router = api_router(tags=["knowledge base"])


@router.post(
    "/knowledge-base/search",
    response_model=SearchOut,
    operation_id="search_knowledge_base",
    summary="Search the tenant's documents (hybrid, keyword or semantic); cited passages",
    openapi_extra={"x-reads-only": True},
)
async def search(body: SearchIn, request: Request, who: CurrentPrincipal) -> Any:
    # A search reads only: read API keys may search, and the transactions are read-only.
    # 1. Authorize and count it against the rate limit (one round trip), so that a refused caller
    #    costs no embedding; 2. embed the query with no connection held; 3. search.
    ctx = await tenant_context(request, who)
    cpu = request.app.state.load.embedding
    if body.mode != "keyword":
        cpu.gate.check_room(ctx.tenant_id)  # this tenant's embedding queue is full: refuse before any work
    async with open_tenant_session(request, who, ctx, "viewer", read_only=True):
        pass
    model = embedder(request.app.state.settings)
    params = await search_service.prepare(model, cpu, ctx.tenant_id, body)
    async with open_tenant_session(request, who, ctx, "viewer", read_only=True, count=False) as s:
        return await search_service.search(s.tx, model, body, params)


def _refused(status: int, message: str) -> Problem:
    titles = {413: "Content Too Large", 415: "Unsupported Media Type", 422: "Validation failed"}
    return Problem(
        status,
        titles.get(status, "Bad Request"),
        f"file: {message}",
        type_="validation" if status == 422 else None,
        errors=[{"field": "file", "message": message, "type": "value_error"}],
    )


FILE_RESPONSES: dict[int | str, dict[str, Any]] = {
    413: {
        "description": "The file is larger than the limit in force: the tenant's `max_file_bytes` (its plan's, or "
        "its own), or the platform's ceiling if smaller (application/problem+json, field `file`, the limit in bytes)"
    },
    415: {
        "description": "Not a PDF, DOCX, HTML, Markdown or text file, or its content is not the type it is "
        "declared as (application/problem+json, field `file`)"
    },
    422: {
        "description": "An empty file, an encrypted PDF, a zip bomb in a DOCX, or a bad form field "
        "(application/problem+json)"
    },
    403: {"description": "The role may not upload, or the plan's storage limit (max_kb_bytes) is reached"},
}


# Optional form fields, but not nullable in the schema: a form has no null (a client leaves the field out).
FormTitle = Annotated[str, Form(min_length=1, max_length=500, description="Default: the file name")]
FormSource = Annotated[str, Form(min_length=1, max_length=1000, description="Where it comes from")]
FormLanguage = Annotated[
    str, Form(pattern=r"^[a-z]{2,3}(-[A-Z]{2})?$", max_length=8, description="ISO 639 code, e.g. fr")
]


@router.post(
    "/knowledge-base/files",
    status_code=201,
    response_model=FileUploadOut,
    operation_id="upload_knowledge_file",
    summary="Upload a file (PDF, DOCX, HTML, Markdown, text) as a document; indexed in the background",
    description=(
        "The type is read from the content. The file becomes a document (`document`, with `index_status` "
        "`pending`) that the worker indexes from the file, page by page for a PDF; a file it cannot read "
        "(no text layer, damaged) leaves the document `failed` with the reason in `index_error`. The original "
        "is kept and counted in the plan's storage limit; `GET /knowledge-base/files/{file_id}` returns it."
    ),
    responses=FILE_RESPONSES,
)
async def upload_file(
    request: Request,
    who: CurrentPrincipal,
    file: Annotated[UploadFile, File(description="The file (multipart/form-data)")],
    title: FormTitle = None,  # type: ignore[assignment]
    source: FormSource = None,  # type: ignore[assignment]
    language: FormLanguage = None,  # type: ignore[assignment]
    idempotency: Idempotent = None,  # type: ignore[assignment]  # None: called by the console (no header)
) -> Any:
    # Authorized (and counted) before any work on the file; the checks run with no transaction open.
    # The size limit in force (the tenant's max_file_bytes within the platform's ceiling) is read then.
    ctx = await tenant_context(request, who)
    settings = request.app.state.settings
    async with open_tenant_session(request, who, ctx, "member", read_only=False) as s:
        limit = await files_service.file_limit(s.tx, ctx.tenant_id, settings.kb_max_file_bytes)
    data = await file.read()
    try:
        media_type = await anyio.to_thread.run_sync(
            files_service.inspect, data, file.filename, file.content_type, limit
        )
    except files_service.FileRefused as err:
        raise _refused(err.status, str(err)) from err
    async with open_tenant_session(request, who, ctx, "member", read_only=False, count=False) as s:

        async def store(last: bool) -> Any:
            return await files_service.store(
                s.tx,
                ctx.tenant_id,
                filename=file.filename or "file",
                media_type=media_type,
                data=data,
                title=title,
                source=source,
                language=language,
            )

        return await idempotency.create(s, store) if idempotency is not None else await store(True)


@router.get(
    "/knowledge-base/files",
    response_model=Page[FileOut],
    operation_id="list_knowledge_files",
    summary="List uploaded files, newest first",
)
async def list_files(
    s: Viewer,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Page size")] = DEFAULT_LIMIT,
    cursor: cursor_param(int) = None,  # type: ignore[valid-type]
) -> Any:
    after = pagination.decode(cursor, int) if cursor else None
    rows = await files_service.page(s.tx, s.ctx.tenant_id, limit, after)
    items, next_cursor = pagination.page_of(rows, limit)
    return {"items": items, "next_cursor": next_cursor}


@router.get(
    "/knowledge-base/files/{file_id}",
    operation_id="download_knowledge_file",
    summary="Download an uploaded file, byte for byte",
    response_class=Response,
    responses={
        200: {
            "description": "The original file, with the type detected at upload (always as an attachment)",
            # The type detected at upload, one of these (never guessed from the name).
            "content": {t: {"schema": {"type": "string", "format": "binary"}} for t in extraction.MEDIA_TYPES},
        },
        404: {"description": "No such file in this tenant (application/problem+json)"},
    },
)
async def download_file(file_id: Annotated[int, Path()], s: Viewer) -> Response:
    row = await files_service.get(s.tx, s.ctx.tenant_id, file_id) if file_id in search_service.BIGINT else None
    if row is None:
        raise not_found("file", file_id)
    return Response(
        content=bytes(row["content"]),
        headers={
            # As stored, with no charset added: the bytes are the original's, whatever their encoding.
            "Content-Type": row["media_type"],
            "Content-Disposition": files_service.content_disposition(row["filename"]),
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "sandbox",
            "ETag": f'"{row["sha256"]}"',
        },
    )
