"""Validated shapes of tenant data. The database checks the same rules (006): this layer exists
to name the offending field in a clear message before anything reaches PostgreSQL."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, field_validator

from iafactory.emails import Email

Region = Literal["DZ", "CH", "FR", "BE", "CA"]
Plan = Literal["free", "pro", "enterprise"]
Status = Literal["active", "suspended", "trial", "cancelled"]
Role = Literal["owner", "admin", "member", "viewer"]

SLUG_PATTERN = r"^[a-z0-9]+(-[a-z0-9]+)*$"
MAX_JSON_BYTES = 64 * 1024


def _bounded_json_object(value: dict[str, Any] | None) -> dict[str, Any]:
    import json

    value = {} if value is None else value
    if len(json.dumps(value, ensure_ascii=False).encode()) > MAX_JSON_BYTES:
        raise ValueError(f"must be at most {MAX_JSON_BYTES} bytes of JSON")
    return value


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=255)
    slug: str = Field(min_length=1, max_length=100)
    region: Region
    plan: Plan = "free"
    status: Status = "trial"
    admin_email: Email | None = None
    admin_phone: str | None = Field(default=None, max_length=50)
    settings: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    trial_ends_at: datetime | None = None

    _json_size = field_validator("settings", "metadata")(_bounded_json_object)

    @field_validator("slug")
    @classmethod
    def _url_safe(cls, value: str) -> str:
        if not re.fullmatch(SLUG_PATTERN, value):
            raise ValueError("use lowercase letters, digits and single dashes, e.g. cabinet-dupont-geneve")
        return value

    @field_validator("trial_ends_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("needs a time zone, e.g. 2026-12-31T23:59:59Z")
        return value


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
    settings: dict[str, Any] | None = None

    _json_size = field_validator("settings")(lambda v: None if v is None else _bounded_json_object(v))


class LimitOverrides(BaseModel):
    """Per-tenant overrides of the plan's limits; null removes an override."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int | None = Field(default=None, ge=1)
    key_requests_per_minute: int | None = Field(default=None, ge=1)
    max_members: int | None = Field(default=None, ge=1)
    max_api_keys: int | None = Field(default=None, ge=0)
    max_kb_bytes: int | None = Field(default=None, ge=0)
    monthly_credits: int | None = Field(default=None, ge=0)


class AdminTenantUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    plan: Plan | None = None
    status: Status | None = None
    limits: LimitOverrides | None = Field(default=None, description="Replaces the tenant's limit overrides.")


class CreditGrant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount: int = Field(ge=1, le=10**12)
    reason: str = Field(min_length=1, max_length=500)
    idempotency_key: str = Field(min_length=1, max_length=255,
                                 description="Retrying with the same key grants once.")
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
