"""PME analyses: a financial health analysis of a small or medium company for one fiscal year."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal
from uuid import UUID

from pydantic import BaseModel, Field

from iafactory.resources import Resource
from iafactory.resources.types import JsonObject, Name, Patch, Strict, decimal_rules

AnalysisStatus = Literal["draft", "running", "completed", "failed"]

Sector = Annotated[str, Field(min_length=1, max_length=100)]
FiscalYear = Annotated[int, Field(ge=1900, le=2100)]
# numeric(5, 2) between 0 and 100.
Score = Annotated[Decimal, decimal_rules(5, 2, maximum=100)]


class AnalysisCreate(Strict):
    company_name: Name
    sector: Sector | None = None
    fiscal_year: FiscalYear | None = None
    status: AnalysisStatus = "draft"
    inputs: JsonObject = {}
    results: JsonObject | None = None
    score: Score | None = None


class AnalysisUpdate(Patch):
    company_name: Name = None  # type: ignore[assignment]
    sector: Sector | None = None
    fiscal_year: FiscalYear | None = None
    status: AnalysisStatus = None  # type: ignore[assignment]
    inputs: JsonObject = None  # type: ignore[assignment]
    results: JsonObject | None = None
    score: Score | None = None


class AnalysisOut(BaseModel):
    id: UUID
    company_name: str
    sector: str | None
    fiscal_year: int | None
    status: AnalysisStatus
    inputs: dict
    results: dict | None
    score: float | None
    created_at: datetime
    updated_at: datetime


PME_ANALYSES = Resource(
    name="pme-analyses",
    table="pme_analyses",
    noun="PME analysis",
    plural="PME analyses",
    tag="pme",
    create=AnalysisCreate,
    update=AnalysisUpdate,
    read=AnalysisOut,
    json_columns=frozenset({"inputs", "results"}),
    create_responses=(
        (402, "Not enough credits: each analysis costs credits, debited with it (GET /credits/balance)"),
    ),
)
