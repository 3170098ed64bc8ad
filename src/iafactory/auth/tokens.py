"""Access tokens: HS256 JWTs with issuer, audience and expiry, verified strictly."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import jwt

from iafactory.config import Settings

ALGORITHM = "HS256"


class InvalidToken(Exception):
    pass


@dataclass(frozen=True)
class TokenClaims:
    user_id: int
    tenant_id: uuid.UUID | None
    role: str | None
    platform_admin: bool


def issue(settings: Settings, user_id: int, *, tenant_id: uuid.UUID | None = None, role: str | None = None,
          platform_admin: bool = False) -> tuple[str, int]:
    now = int(time.time())
    ttl = settings.access_token_ttl_seconds
    claims: dict[str, object] = {
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "sub": str(user_id),
        "iat": now,
        "nbf": now,
        "exp": now + ttl,
        "jti": uuid.uuid4().hex,
    }
    if tenant_id is not None:
        claims["tenant_id"] = str(tenant_id)
        claims["role"] = role
    if platform_admin:
        claims["platform_admin"] = True
    return jwt.encode(claims, settings.jwt_secret.get_secret_value(), algorithm=ALGORITHM), ttl


def verify(settings: Settings, token: str) -> TokenClaims:
    try:
        claims = jwt.decode(
            token,
            settings.jwt_secret.get_secret_value(),
            algorithms=[ALGORITHM],  # never "none", never an algorithm the token picks
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            options={"require": ["exp", "iat", "sub", "iss", "aud"]},
            leeway=5,
        )
    except jwt.ExpiredSignatureError as err:
        raise InvalidToken("token has expired") from err
    except jwt.InvalidAudienceError as err:
        raise InvalidToken("token is for another audience") from err
    except jwt.InvalidSignatureError as err:
        raise InvalidToken("token signature is invalid") from err
    except jwt.InvalidTokenError as err:
        raise InvalidToken("invalid token") from err
    try:
        user_id = int(claims["sub"])
        tenant_id = uuid.UUID(claims["tenant_id"]) if claims.get("tenant_id") else None
    except (ValueError, TypeError) as err:
        raise InvalidToken("invalid token: malformed claims") from err
    return TokenClaims(user_id, tenant_id, claims.get("role"), bool(claims.get("platform_admin")))
