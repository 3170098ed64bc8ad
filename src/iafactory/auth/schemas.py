"""Request and response shapes of authentication and API keys."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, model_validator

from iafactory.emails import Email
from iafactory.resources.types import timestamp_rules
from iafactory.tenancy.schemas import Region, Role

Expiry = Annotated[datetime, timestamp_rules("Optional expiry, in the future (RFC 3339 with a time zone).")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# A new password, wherever one is chosen (registration, an operator's --password-stdin).
NewPassword = Annotated[str, Field(min_length=10, max_length=200, description="At least 10 characters.")]


class RegisterIn(Strict):
    email: Email
    password: NewPassword
    name: str = Field(default="", max_length=255)
    region: Region | None = Field(
        default=None,
        description="Where the account lives (the cell serving this region); default: the service's first cell. "
        "An account joins tenants of its own cell.",
    )


class LoginIn(Strict):
    email: Email
    password: str = Field(min_length=1, max_length=200)


class AcceptInvitationIn(Strict):
    token: str = Field(min_length=1, max_length=200, description="The token of the invitation's link.")
    name: str | None = Field(
        default=None, max_length=255, description="A new person's name (with password: creates their account)."
    )
    password: NewPassword | None = Field(
        default=None,
        description="A new person's password: creates the account of the invited email. Without it, send the "
        "token of your existing account (signed in) as Authorization: Bearer.",
    )


class SelectTenantIn(Strict):
    tenant: str = Field(min_length=1, max_length=100, description="Tenant id or slug.")


class Membership(BaseModel):
    id: UUID
    slug: str
    name: str
    role: Role
    status: str
    cell: str | None = Field(default=None, description="The region cell holding the tenant's data.")


class MyTenant(Membership):
    current: bool = Field(
        description="True for the tenant this credential acts for (the selected tenant of "
        "a token, the tenant of an API key)."
    )


class TokenOut(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int
    tenant: Membership | None = Field(description="The tenant this token acts for, if one is selected.")
    tenants: list[Membership]


class UserOut(BaseModel):
    id: int
    email: str
    name: str
    is_platform_admin: bool
    created_at: datetime


class MeOut(BaseModel):
    user: UserOut | None
    tenant: Membership | None
    role: Role | None
    api_key_id: UUID | None = None
    tenants: list[MyTenant] = Field(
        default=[],
        description="Every tenant of the caller, with their role there; an API key has exactly one, its own.",
    )


class ApiKeyCreate(Strict):
    name: str = Field(min_length=1, max_length=100)
    scope: Literal["read", "write"] = "read"
    expires_at: Expiry | None = None

    @model_validator(mode="after")
    def _aware(self) -> ApiKeyCreate:
        if self.expires_at is not None and self.expires_at.tzinfo is None:
            raise ValueError("expires_at needs a time zone, e.g. 2027-01-01T00:00:00Z")
        if self.expires_at is not None and self.expires_at <= datetime.now(UTC):
            raise ValueError("expires_at must be in the future")
        return self


class ApiKeyOut(BaseModel):
    id: UUID
    name: str
    prefix: str = Field(description="Public start of the key, to recognise it; the secret is never shown again.")
    scope: Literal["read", "write"]
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyOut):
    key: str | None = Field(
        description="The secret key. Shown once: store it now. null when this answer is "
        "replayed for a retried Idempotency-Key: the secret is never stored, so "
        "revoke that key and create another."
    )
