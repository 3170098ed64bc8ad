"""Knowledge base: the tenant's documents with their index status (paged), a form to add a
document (members, as POST /api/v1/knowledge-base), a form to upload a file (members, as POST
/api/v1/knowledge-base/files: the API's own handler, its checks of the type and size), and a search box whose answer is the API's own
search (POST /api/v1/knowledge-base/search: the same handler, its gate and its embedding pool):
passages with their sources (title, chunk, page when the document is a paged file, relevance)."""

from __future__ import annotations

from typing import Any

from fastapi import Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from iafactory.console.web import Ctx, page
from iafactory.http.idempotency import Idempotency
from iafactory.http.problems import Problem
from iafactory.knowledge import endpoints as knowledge_endpoints
from iafactory.knowledge import files as files_service
from iafactory.knowledge.schemas import KNOWLEDGE_BASE, DocumentCreate, SearchIn
from iafactory.resources import pagination, repository

DONE = frozenset({"document_added", "file_uploaded"})
PAGE_SIZE = 20
FILES_SHOWN = 100
MODES = ("hybrid", "keyword", "semantic")


def errors_of(err: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg'].removeprefix('Value error, ')}" for e in err.errors()
    )


async def view(c: Ctx, *, status: int = 200, error: str | None = None, form: dict[str, str] | None = None) -> Response:
    query = c.request.query_params
    cursor = query.get("cursor") or None
    try:
        after = pagination.decode(cursor, int) if cursor else None
    except Problem:
        after, cursor = None, None
    q = (query.get("q") or "").strip()
    mode = query.get("mode") if query.get("mode") in MODES else "hybrid"
    result: dict[str, Any] | None = None
    if q:
        try:
            body = SearchIn(query=q[:2000], mode=mode, k=10)
        except ValidationError as err:
            error = errors_of(err)
        else:
            assert c.who is not None
            # The API's own handler: tenant_context → open_tenant_session("viewer", read-only), the
            # query embedded with no transaction open, then the search in a second one.
            result = await knowledge_endpoints.search(body, c.request, c.who)
    async with c.tenant(read_only=True, role="viewer") as s:
        rows = await repository.page(s.tx, KNOWLEDGE_BASE, s.ctx.tenant_id, PAGE_SIZE, after)
        # The uploaded files behind documents (GET /knowledge-base/files): the newest FILES_SHOWN.
        files = await files_service.page(s.tx, s.ctx.tenant_id, FILES_SHOWN, None)
    documents, next_cursor = pagination.page_of(rows, PAGE_SIZE)
    by_document = {f["document_id"]: f for f in files[:FILES_SHOWN]}
    documents = [
        {
            **d,
            "file": by_document.get(d["id"]),
            "size": by_document[d["id"]]["size_bytes"] if d["id"] in by_document else len(d["content"].encode()),
        }
        for d in documents
    ]
    done = query.get("done")
    return c.render(
        "knowledge.html",
        status=status,
        title=c.t("kb.title"),
        documents=documents,
        next_cursor=next_cursor,
        first_page=cursor is None,
        q=q,
        mode=mode,
        modes=MODES,
        result=result,
        error=error,
        form=form or {},
        done=done if done in DONE else None,
    )


@page("GET", "/knowledge", role="viewer", api="GET /api/v1/knowledge-base")
async def knowledge_page(c: Ctx) -> Response:
    return await view(c)


@page("POST", "/knowledge", role="member", api="POST /api/v1/knowledge-base")
async def add_document(c: Ctx) -> Response:
    form = {k: c.form.get(k, "").strip() for k in ("title", "content", "source", "language")}
    try:
        body = DocumentCreate.model_validate(
            {
                "title": form["title"],
                "content": form["content"],
                "source": form["source"] or None,
                "language": form["language"] or None,
            }
        )
    except ValidationError as err:
        return await view(c, status=422, error=errors_of(err), form=form)
    try:
        async with c.tenant() as s:
            # What the API's create route does (iafactory.resources.router): wake the indexing
            # workers from this transaction (delivered when it commits), insert the row.
            await s.tx.execute("SELECT pg_notify(%s, '')", (KNOWLEDGE_BASE.wakes,))
            values = body.model_dump()
            await Idempotency(None, c.request).create(
                s, lambda last: repository.insert(s.tx, KNOWLEDGE_BASE, s.ctx.tenant_id, values, last=last)
            )
    except Problem as problem:
        if problem.status in (401, 403):
            raise
        return await view(c, status=problem.status, error=problem.detail, form=form)
    return c.redirect("/knowledge", done="document_added")


@page("POST", "/knowledge/files", role="member", api="POST /api/v1/knowledge-base/files")
async def upload_file(c: Ctx) -> Response:
    """A multipart form (the CSRF token among its fields, checked by the framework first): the
    API's upload handler itself, which authorizes, inspects the file with no transaction open,
    then stores it as a document that the worker indexes."""
    form = await c.request.form()  # parsed once by the framework; the file is kept here
    upload = form.get("file")
    values = {k: c.form.get(k, "").strip() for k in ("title", "source", "language")}
    if not isinstance(upload, UploadFile) or not upload.filename:
        return await view(c, status=422, error=f"file: {c.t('kb.file_missing')}", form=values)
    try:  # the rules of the API's form fields (the same as a document's)
        DocumentCreate.model_validate(
            {
                "title": values["title"] or "-",
                "source": values["source"] or None,
                "language": values["language"] or None,
            }
        )
    except ValidationError as err:
        return await view(c, status=422, error=errors_of(err), form=values)
    assert c.who is not None
    try:
        await knowledge_endpoints.upload_file(
            c.request,
            c.who,
            upload,  # type: ignore[arg-type]  # Starlette's UploadFile, of which FastAPI's is a subclass
            # Absent fields are None, as the API's handler receives them from an empty form.
            title=values["title"] or None,  # type: ignore[arg-type]
            source=values["source"] or None,  # type: ignore[arg-type]
            language=values["language"] or None,  # type: ignore[arg-type]
        )
    except Problem as problem:
        if problem.status in (401, 403):
            raise
        return await view(c, status=problem.status, error=problem.detail, form=values)
    return c.redirect("/knowledge", done="file_uploaded")


@page(
    "GET",
    "/knowledge/files/{file_id:int}",
    role="viewer",
    api="GET /api/v1/knowledge-base/files/{file_id}",
    params={"file_id": "knowledge_file"},
)
async def download_file(c: Ctx) -> Response:
    """The original file, byte for byte, as the API's download answers it (an attachment, sandboxed)."""
    file_id: int = c.request.path_params["file_id"]
    async with c.tenant() as s:
        response = await knowledge_endpoints.download_file(file_id, s)
    return c.finish(response)
