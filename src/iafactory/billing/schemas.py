"""Billing: the tenant's billing account, its credit ledger, and metered usage events.

The credit balance is the ledger's, never a client's: no schema here accepts it, so a request
that sends `credit_balance` is refused (422, unknown field)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal
from uuid import UUID

from pydantic import BaseModel, EmailStr, Field

from iafactory.resources.types import JsonObject, Patch, Strict, Timestamp, decimal_rules

Currency = Literal["DZD", "CHF", "EUR", "CAD"]
CreditKind = Literal["grant", "debit", "refund", "adjustment"]
MAX_EVENTS_PER_BATCH = 1000
Quantity = Annotated[Decimal, decimal_rules(20, 6)]  # numeric(20, 6), not negative


# --- Billing account -----------------------------------------------------------------------------


class BillingAccountUpdate(Patch):
    billing_name: Annotated[str, Field(max_length=255)] = None  # type: ignore[assignment]
    billing_email: Annotated[EmailStr, Field(max_length=255)] | None = None
    address: Annotated[str, Field(max_length=2000)] = None  # type: ignore[assignment]
    vat_number: Annotated[str, Field(min_length=1, max_length=50)] | None = None
    currency: Currency = None  # type: ignore[assignment]


class BillingAccount(BaseModel):
    billing_name: str
    billing_email: str | None
    address: str
    vat_number: str | None
    currency: Currency = Field(
        description="The currency of the tenant's region unless set (DZ: DZD, CH: CHF, FR and BE: EUR, CA: CAD)"
    )
    credit_balance: int = Field(description="Credits, in whole units; changed only by ledger transactions")
    created_at: datetime | None = Field(description="null until the account is first saved")
    updated_at: datetime | None


# --- Credits -------------------------------------------------------------------------------------


class CreditTransaction(BaseModel):
    id: UUID
    kind: CreditKind
    amount: int = Field(description="Signed: grants and refunds add, debits subtract")
    reason: str
    idempotency_key: str
    balance_after: int
    created_by: int | None
    created_at: datetime


class CreditBalance(BaseModel):
    balance: int
    currency: Currency


# --- Usage events --------------------------------------------------------------------------------


class UsageEventIn(Strict):
    event_type: Annotated[str, Field(min_length=1, max_length=100, description="e.g. llm.tokens, voice.minutes")]
    quantity: Quantity = Field(default=Decimal(1), json_schema_extra={"default": 1})
    occurred_at: Timestamp | None = Field(default=None, description="Defaults to the time it is received")
    idempotency_key: Annotated[
        str, Field(min_length=1, max_length=255, description="A retried delivery with the same key is counted once")
    ]
    properties: JsonObject = {}


class UsageBatch(Strict):
    events: Annotated[list[UsageEventIn], Field(min_length=1, max_length=MAX_EVENTS_PER_BATCH)]


class UsageBatchResult(BaseModel):
    accepted: list[str] = Field(description="Keys stored by this request, in batch order")
    duplicates: list[str] = Field(description="Keys that were already stored before this request")


class UsageEvent(BaseModel):
    id: UUID
    event_type: str
    quantity: float
    occurred_at: datetime
    idempotency_key: str
    properties: dict
    user_id: int | None
    api_key_id: UUID | None
    created_at: datetime


class UsageSummaryRow(BaseModel):
    key: str = Field(description="The event type, or the UTC day (YYYY-MM-DD)")
    events: int
    quantity: float


class UsageSummary(BaseModel):
    since: datetime
    until: datetime
    group_by: Literal["type", "day"]
    rows: list[UsageSummaryRow]
