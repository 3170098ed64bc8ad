"""Projects: a tenant's containers for workflows."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from iafactory.resources import Resource
from iafactory.resources.types import JsonObject, LongText, Name, Patch, Strict

ProjectStatus = Literal["active", "archived"]


class ProjectCreate(Strict):
    name: Name
    description: LongText = ""
    status: ProjectStatus = "active"
    settings: JsonObject = {}


class ProjectUpdate(Patch):
    name: Name = None  # type: ignore[assignment]
    description: LongText = None  # type: ignore[assignment]
    status: ProjectStatus = None  # type: ignore[assignment]
    settings: JsonObject = None  # type: ignore[assignment]


class ProjectOut(BaseModel):
    id: int
    name: str
    description: str
    status: ProjectStatus
    settings: dict
    owner_id: int | None = Field(
        description="The user who created the project; null when an API key created it "
        "(a key acts for the tenant, not for a person)"
    )
    created_at: datetime
    updated_at: datetime


PROJECTS = Resource(
    name="projects",
    table="projects",
    noun="project",
    tag="projects",
    create=ProjectCreate,
    update=ProjectUpdate,
    read=ProjectOut,
    id_type=int,
    json_columns=frozenset({"settings"}),
)
