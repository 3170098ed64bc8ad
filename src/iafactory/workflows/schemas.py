"""Workflows: Bolt (prompt-to-app) and BMAD (agile agent phases) runs, both optionally inside a
project, and the agent orchestrator's per-run state.

These three tables predate tenancy (004, 005): their JSON columns carry no type check in SQL, so
rows written by the single-tenant application may hold any JSON. Writes through this API are
objects or arrays as declared; reads accept whatever JSON is stored.

A workflow's project must be one of the caller's tenant's projects: the composite foreign key
(tenant_id, project_id) → projects (tenant_id, id) refuses any other, and the API answers 409.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from iafactory.resources import Resource
from iafactory.resources.types import JsonArray, JsonObject, LongText, Name, Patch, StoredJson, Strict

RunStatus = Literal["draft", "queued", "running", "completed", "failed", "cancelled"]
BmadPhase = Literal["analysis", "planning", "solutioning", "implementation"]
OrchestratorStatus = Literal["idle", "running", "waiting", "completed", "failed"]
ProjectId = Annotated[int, Field(ge=1, le=2**63 - 1, description="A project of the same tenant")]
# A workflow's project must be a project of the same tenant (composite foreign key).
PROJECT_REFERENCE = ((422, "Invalid body, or project_id names no project of this tenant"),)


# --- Bolt ----------------------------------------------------------------------------------------


class BoltWorkflowCreate(Strict):
    project_id: ProjectId | None = None
    name: Name
    prompt: LongText = ""
    status: RunStatus = "draft"
    definition: JsonObject = {}
    result: JsonObject | None = None


class BoltWorkflowUpdate(Patch):
    project_id: ProjectId | None = None
    name: Name = None  # type: ignore[assignment]
    prompt: LongText = None  # type: ignore[assignment]
    status: RunStatus = None  # type: ignore[assignment]
    definition: JsonObject = None  # type: ignore[assignment]
    result: JsonObject | None = None


class BoltWorkflowOut(BaseModel):
    id: int
    project_id: int | None
    name: str
    prompt: str
    status: RunStatus
    definition: StoredJson
    result: StoredJson
    created_at: datetime
    updated_at: datetime


BOLT_WORKFLOWS = Resource(
    name="bolt-workflows",
    table="bolt_workflows",
    noun="Bolt workflow",
    tag="workflows",
    create=BoltWorkflowCreate,
    update=BoltWorkflowUpdate,
    read=BoltWorkflowOut,
    id_type=int,
    json_columns=frozenset({"definition", "result"}),
    write_responses=PROJECT_REFERENCE,
)


# --- BMAD ----------------------------------------------------------------------------------------


class BmadWorkflowCreate(Strict):
    project_id: ProjectId | None = None
    name: Name
    phase: BmadPhase = "analysis"
    status: RunStatus = "draft"
    agents: JsonArray = []
    artifacts: JsonObject = {}


class BmadWorkflowUpdate(Patch):
    project_id: ProjectId | None = None
    name: Name = None  # type: ignore[assignment]
    phase: BmadPhase = None  # type: ignore[assignment]
    status: RunStatus = None  # type: ignore[assignment]
    agents: JsonArray = None  # type: ignore[assignment]
    artifacts: JsonObject = None  # type: ignore[assignment]


class BmadWorkflowOut(BaseModel):
    id: int
    project_id: int | None
    name: str
    phase: BmadPhase
    status: RunStatus
    agents: StoredJson
    artifacts: StoredJson
    created_at: datetime
    updated_at: datetime


BMAD_WORKFLOWS = Resource(
    name="bmad-workflows",
    table="bmad_workflows",
    noun="BMAD workflow",
    tag="workflows",
    create=BmadWorkflowCreate,
    update=BmadWorkflowUpdate,
    read=BmadWorkflowOut,
    id_type=int,
    json_columns=frozenset({"agents", "artifacts"}),
    write_responses=PROJECT_REFERENCE,
)


# --- Orchestrator --------------------------------------------------------------------------------

SessionKey = Annotated[str, Field(min_length=1, max_length=255)]
Agent = Annotated[str, Field(min_length=1, max_length=100)]
# strict: `true` is no step (lax mode would take it for 1).
Step = Annotated[int, Field(ge=0, le=2**31 - 1, strict=True)]


class OrchestratorStateCreate(Strict):
    session_key: SessionKey
    agent: Agent
    status: OrchestratorStatus = "idle"
    state: JsonObject = {}
    last_step: Step = 0


class OrchestratorStateUpdate(Patch):
    session_key: SessionKey = None  # type: ignore[assignment]
    agent: Agent = None  # type: ignore[assignment]
    status: OrchestratorStatus = None  # type: ignore[assignment]
    state: JsonObject = None  # type: ignore[assignment]
    last_step: Step = None  # type: ignore[assignment]


class OrchestratorStateOut(BaseModel):
    id: int
    session_key: str
    agent: str
    status: OrchestratorStatus
    state: StoredJson
    last_step: int
    created_at: datetime
    updated_at: datetime


ORCHESTRATOR_STATE = Resource(
    name="orchestrator-state",
    table="orchestrator_state",
    noun="run state",
    plural="run states",
    tag="workflows",
    create=OrchestratorStateCreate,
    update=OrchestratorStateUpdate,
    read=OrchestratorStateOut,
    id_type=int,
    json_columns=frozenset({"state"}),
)
