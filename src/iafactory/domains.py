"""The tenant-owned record types served under /api/v1, one line each. A domain's schemas and its
Resource live in its own package (e.g. iafactory/crm/schemas.py); its routes come from
iafactory.resources.router."""

from __future__ import annotations

from fastapi import APIRouter

from iafactory.billing.endpoints import router as billing_router
from iafactory.crm.schemas import DEALS, LEADS
from iafactory.knowledge.endpoints import router as knowledge_router
from iafactory.knowledge.schemas import KNOWLEDGE_BASE
from iafactory.pme.schemas import PME_ANALYSES
from iafactory.projects.schemas import PROJECTS
from iafactory.resources import Resource
from iafactory.resources.router import crud_router
from iafactory.voice.schemas import CONVERSATIONS, TRANSCRIPTIONS
from iafactory.workflows.schemas import BMAD_WORKFLOWS, BOLT_WORKFLOWS, ORCHESTRATOR_STATE

RESOURCES: list[Resource] = [
    PROJECTS,
    KNOWLEDGE_BASE,
    BOLT_WORKFLOWS,
    BMAD_WORKFLOWS,
    ORCHESTRATOR_STATE,
    TRANSCRIPTIONS,
    CONVERSATIONS,
    LEADS,
    DEALS,
    PME_ANALYSES,
]


def resource_routers() -> list[APIRouter]:
    """One CRUD router per Resource, then the domains that are not plain CRUD: knowledge-base
    search, and billing (an account per tenant, a read-only ledger, batched idempotent usage
    events)."""
    return [knowledge_router, *(crud_router(spec) for spec in RESOURCES), billing_router]
