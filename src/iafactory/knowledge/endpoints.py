"""POST /api/v1/knowledge-base/search."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from iafactory.auth.dependencies import CurrentPrincipal, open_tenant_session, tenant_context
from iafactory.http.rendering import api_router
from iafactory.knowledge import search as search_service
from iafactory.knowledge.embeddings import embedder
from iafactory.knowledge.schemas import SearchIn, SearchOut

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
