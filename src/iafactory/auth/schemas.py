"""Request and response shapes of authentication and API keys."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from iafactory.auth import policy
from iafactory.emails import Email
from iafactory.resources.types import timestamp_rules
from iafactory.tenancy.schemas import Region, Role

Expiry = Annotated[datetime, timestamp_rules("Optional expiry, in the future (RFC 3339 with a time zone).")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# A new password, wherever one is chosen (registration, an operator's --password-stdin, a change):
# the policy of iafactory.auth.policy (ASVS 5.0 V6.2).
NewPassword = Annotated[
    str,
    Field(
        min_length=policy.MIN_LENGTH,
        max_length=policy.MAX_LENGTH,
        description=f"{policy.MIN_LENGTH} to {policy.MAX_LENGTH} characters, any of them (spaces too; 15 or more, "
        "e.g. a few words, is better). Refused: one of the 30,000 most common passwords, a repeated pattern "
        "(aaaaaaaaaa), a simple sequence (1234567890), only spaces, or your email address.",
    ),
    AfterValidator(policy.check),
]


class RegisterIn(Strict):
    email: Email
    password: NewPassword
    name: str = Field(default="", max_length=255)
    region: Region | None = Field(
        default=None,
        description="Where the account lives (the cell serving this region); default: the service's first cell. "
        "An account joins tenants of its own cell.",
    )

    @field_validator("password")
    @classmethod
    def _not_the_email(cls, value: str, info: ValidationInfo) -> str:
        return policy.check(value, info.data.get("email"))


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


class RefreshIn(Strict):
    refresh_token: str = Field(
        min_length=1,
        max_length=200,
        description="The refresh token of the last sign-in or refresh; each is good for one use.",
    )


class PasswordChangeIn(Strict):
    current_password: str = Field(min_length=1, max_length=200)
    new_password: NewPassword


class PasswordResetIn(Strict):
    email: Email


class PasswordResetOut(BaseModel):
    detail: str = Field(description="The same answer whether or not the email has an account.")


class PasswordResetConfirmIn(Strict):
    token: str = Field(min_length=1, max_length=200, description="The token of the reset email's link.")
    new_password: NewPassword


class SessionOut(BaseModel):
    id: UUID
    created_at: datetime = Field(description="When this session signed in.")
    last_used_at: datetime = Field(description="Its last sign-in, refresh or tenant selection.")
    expires_at: datetime = Field(description="When it ends unless refreshed (never later than 30 days after sign-in).")
    ip: str | None = Field(description="The client address of its last sign-in or refresh.")
    user_agent: str | None
    selected_tenant: UUID | None = Field(description="The tenant its tokens act for.")
    cell: str | None = Field(default=None, description="The region cell holding the session.")
    current: bool = Field(description="True for the session of the token making this request.")


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
    expires_in: int = Field(description="Seconds the access token is valid (15 minutes by default).")
    refresh_token: str = Field(
        description="Opaque, single use: POST it to /api/v1/auth/refresh for a new pair before the session ends. "
        "Using one twice ends the session."
    )
    tenant: Membership | None = Field(description="The tenant this token acts for, if one is selected.")
    tenants: list[Membership]


class UserOut(BaseModel):
    id: int
    email: str
    name: str
    is_platform_admin: bool
    email_verified: bool = Field(
        description="False for an account that registered itself and has not opened the link of its "
        "verification email yet: it signs in, but cannot create a tenant."
    )
    created_at: datetime


class RegisterOut(BaseModel):
    detail: str = Field(description="The same answer whether or not the email has an account.")


class VerifyEmailIn(Strict):
    token: str = Field(min_length=1, max_length=200, description="The token of the verification email's link.")


class VerifyEmailResendOut(BaseModel):
    detail: str


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
