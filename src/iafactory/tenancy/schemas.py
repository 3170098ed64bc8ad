"""Validated shapes of tenant data. The database checks the same rules (006): this layer exists
to name the offending field in a clear message before anything reaches PostgreSQL."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, field_validator

from iafactory.emails import Email
from iafactory.resources.types import JsonObject, Timestamp, int_rules

Region = Literal["DZ", "CH", "FR", "BE", "CA"]
Plan = Literal["free", "pro", "enterprise"]
Status = Literal["active", "suspended", "trial", "cancelled"]
Role = Literal["owner", "admin", "member", "viewer"]

SLUG_PATTERN = r"^[a-z0-9]+(-[a-z0-9]+)*$"
AtLeastOne = Annotated[int, int_rules(ge=1)]
AtLeastZero = Annotated[int, int_rules(ge=0)]


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=255)
    # The pattern is stated in the schema; _url_safe checks it with a clearer message.
    slug: str = Field(min_length=1, max_length=100, json_schema_extra={"pattern": SLUG_PATTERN})
    region: Region
    plan: Plan = "free"
    status: Status = "trial"
    admin_email: Email | None = None
    admin_phone: str | None = Field(default=None, max_length=50)
    settings: JsonObject = Field(default_factory=dict)
    metadata: JsonObject = Field(default_factory=dict)
    trial_ends_at: Timestamp | None = None

    @field_validator("slug")
    @classmethod
    def _url_safe(cls, value: str) -> str:
        if not re.fullmatch(SLUG_PATTERN, value):
            raise ValueError("use lowercase letters, digits and single dashes, e.g. cabinet-dupont-geneve")
        return value


class SelfServiceTenantCreate(BaseModel):
    """A tenant a signed-in user creates for themselves (POST /api/v1/tenants): plan free, status
    trial; the rest (contact, settings) is edited afterwards with PATCH /api/v1/tenant."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=255)
    slug: str = Field(min_length=1, max_length=100, json_schema_extra={"pattern": SLUG_PATTERN})
    region: Region

    @field_validator("slug")
    @classmethod
    def _url_safe(cls, value: str) -> str:
        return TenantCreate._url_safe(value)


class Tenant(BaseModel):
    id: UUID
    name: str
    slug: str
    region: Region
    plan: Plan
    status: Status
    admin_email: str | None
    admin_phone: str | None
    settings: dict[str, Any]
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    trial_ends_at: datetime | None


class TenantFilters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    region: Region | None = None
    plan: Plan | None = None
    status: Status | None = None


class TenantUpdate(BaseModel):
    """What a tenant's owner may change. Region, plan and status belong to the platform."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=255)
    admin_email: Email | None = None
    admin_phone: str | None = Field(default=None, max_length=50)
    settings: JsonObject | None = None


class LimitOverrides(BaseModel):
    """Per-tenant overrides of the plan's limits; null removes an override."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: AtLeastOne | None = None
    key_requests_per_minute: AtLeastOne | None = None
    max_members: AtLeastOne | None = None
    max_api_keys: AtLeastZero | None = None
    max_kb_bytes: AtLeastZero | None = None
    monthly_credits: AtLeastZero | None = None
    max_file_bytes: AtLeastOne | None = Field(
        default=None, description="The largest single uploaded file, in bytes (within the platform's ceiling)"
    )


class AdminTenantUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    plan: Plan | None = None
    status: Status | None = None
    limits: LimitOverrides | None = Field(default=None, description="Replaces the tenant's limit overrides.")


class CreditGrant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount: int = Field(ge=1, le=10**12)
    reason: str = Field(min_length=1, max_length=500)
    idempotency_key: str = Field(min_length=1, max_length=255, description="Retrying with the same key grants once.")
    kind: Literal["grant", "refund"] = "grant"


class CreditResult(BaseModel):
    transaction_id: UUID
    balance: int
    duplicate: bool


class MemberOut(BaseModel):
    user_id: int
    email: str
    name: str
    role: Role
    created_at: datetime


class MemberCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: Email
    role: Role = "member"


class MemberUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role


class InvitationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: Email
    role: Role = "member"


class InvitationOut(BaseModel):
    id: UUID
    email: str
    role: Role
    status: Literal["pending", "accepted", "revoked", "expired"]
    invited_by: int | None
    created_at: datetime
    expires_at: datetime
    accepted_at: datetime | None
    revoked_at: datetime | None
    last_sent_at: datetime
