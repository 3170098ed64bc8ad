"""POST /api/v1/knowledge-base/search."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Request

from iafactory.auth.dependencies import TenantSession, tenant_session
from iafactory.http.rendering import api_router
from iafactory.knowledge import search as search_service
from iafactory.knowledge.embeddings import embedder
from iafactory.knowledge.schemas import SearchIn, SearchOut

router = api_router(tags=["knowledge base"])

# A search reads only: read API keys may search, and the transaction is read-only.
Searcher = Annotated[TenantSession, tenant_session("viewer", read_only=True)]


@router.post("/knowledge-base/search", response_model=SearchOut, operation_id="search_knowledge_base",
             summary="Search the tenant's documents (hybrid, keyword or semantic); cited passages",
             openapi_extra={"x-reads-only": True})
async def search(body: SearchIn, request: Request, s: Searcher) -> Any:
    return await search_service.search(s.tx, embedder(request.app.state.settings), body)
