"""CRM: leads, and the deals opened with them. A deal's lead must be a lead of the same tenant:
the composite foreign key (tenant_id, lead_id) → crm_leads (tenant_id, id) refuses any other
(409), and a lead that still has deals cannot be deleted (409)."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Literal
from uuid import UUID

from pydantic import BaseModel, EmailStr, Field

from iafactory.resources import Resource
from iafactory.resources.types import JsonObject, LongText, Name, Patch, Strict, decimal_rules

LeadStatus = Literal["new", "contacted", "qualified", "converted", "lost"]
DealStage = Literal["prospecting", "proposal", "negotiation", "won", "lost"]
Currency = Literal["DZD", "CHF", "EUR", "CAD"]

Email = Annotated[EmailStr, Field(max_length=255)]
Phone = Annotated[str, Field(min_length=1, max_length=50)]
Company = Annotated[str, Field(min_length=1, max_length=255)]
LeadSource = Annotated[str, Field(min_length=1, max_length=50, description="e.g. manual, website, salon, referral")]
Score = Annotated[int, Field(ge=0, le=100)]
# numeric(14, 2), not negative.
Amount = Annotated[Decimal, decimal_rules(14, 2)]


# --- Leads ---------------------------------------------------------------------------------------


class LeadCreate(Strict):
    full_name: Name
    email: Email | None = None
    phone: Phone | None = None
    company: Company | None = None
    source: LeadSource = "manual"
    status: LeadStatus = "new"
    score: Score | None = None
    notes: LongText = ""
    metadata: JsonObject = {}


class LeadUpdate(Patch):
    full_name: Name = None  # type: ignore[assignment]
    email: Email | None = None
    phone: Phone | None = None
    company: Company | None = None
    source: LeadSource = None  # type: ignore[assignment]
    status: LeadStatus = None  # type: ignore[assignment]
    score: Score | None = None
    notes: LongText = None  # type: ignore[assignment]
    metadata: JsonObject = None  # type: ignore[assignment]


class LeadOut(BaseModel):
    id: UUID
    full_name: str
    email: str | None
    phone: str | None
    company: str | None
    source: str
    status: LeadStatus
    score: int | None
    notes: str
    metadata: dict
    created_at: datetime
    updated_at: datetime


LEADS = Resource(
    name="crm/leads",
    table="crm_leads",
    noun="lead",
    tag="crm",
    create=LeadCreate,
    update=LeadUpdate,
    read=LeadOut,
    json_columns=frozenset({"metadata"}),
)


# --- Deals ---------------------------------------------------------------------------------------


class DealCreate(Strict):
    lead_id: UUID = Field(description="A lead of the same tenant")
    title: Name
    amount: Amount = Field(default=Decimal(0), json_schema_extra={"default": 0})
    currency: Currency | None = Field(
        default=None,
        description="Defaults to the currency of the tenant's region (DZ: DZD, CH: CHF, FR and BE: EUR, CA: CAD)",
    )
    stage: DealStage = "prospecting"
    expected_close_date: date | None = None
    metadata: JsonObject = {}


class DealUpdate(Patch):
    lead_id: UUID = None  # type: ignore[assignment]
    title: Name = None  # type: ignore[assignment]
    amount: Amount = None  # type: ignore[assignment]
    currency: Currency = None  # type: ignore[assignment]
    stage: DealStage = None  # type: ignore[assignment]
    expected_close_date: date | None = None
    metadata: JsonObject = None  # type: ignore[assignment]


class DealOut(BaseModel):
    id: UUID
    lead_id: UUID
    title: str
    amount: float
    currency: Currency
    stage: DealStage
    expected_close_date: date | None
    metadata: dict
    created_at: datetime
    updated_at: datetime


DEALS = Resource(
    name="crm/deals",
    table="crm_deals",
    noun="deal",
    tag="crm",
    create=DealCreate,
    update=DealUpdate,
    read=DealOut,
    json_columns=frozenset({"metadata"}),
    write_responses=((422, "Invalid body, or lead_id names no lead of this tenant"),),
)
