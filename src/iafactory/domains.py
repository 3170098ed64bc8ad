"""The tenant-owned record types served under /api/v1, one line each. A domain's schemas and its
Resource live in its own package (e.g. iafactory/crm/schemas.py); its routes come from
iafactory.resources.router."""

from __future__ import annotations

from fastapi import APIRouter

from iafactory.projects.schemas import PROJECTS
from iafactory.resources import Resource
from iafactory.resources.router import crud_router

RESOURCES: list[Resource] = [
    PROJECTS,
]


def resource_routers() -> list[APIRouter]:
    return [crud_router(spec) for spec in RESOURCES]
