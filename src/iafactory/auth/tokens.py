"""Access tokens: HS256 JWTs with issuer, audience and expiry, verified strictly."""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
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
    expires_at: float = 0.0


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


# Verified tokens, until they expire: checking a signature and parsing the claims on every
# request cost more than the request's SQL. Revocation does not depend on this cache: membership,
# role and tenant status are re-checked in the database on every request.
_VERIFIED: OrderedDict[tuple[str, str, str, str], tuple[float, TokenClaims]] = OrderedDict()
_VERIFIED_MAX = 10_000


def verify(settings: Settings, token: str) -> TokenClaims:
    key = (settings.jwt_secret.get_secret_value(), settings.jwt_audience, settings.jwt_issuer, token)
    hit = _VERIFIED.get(key)
    if hit is not None:
        if hit[0] > time.time():
            return hit[1]
        del _VERIFIED[key]
        raise InvalidToken("token has expired")
    claims = _verify(settings, token)
    _VERIFIED[key] = (claims.expires_at, claims)
    if len(_VERIFIED) > _VERIFIED_MAX:
        _VERIFIED.popitem(last=False)
    return claims


def _verify(settings: Settings, token: str) -> TokenClaims:
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
    return TokenClaims(user_id, tenant_id, claims.get("role"), bool(claims.get("platform_admin")),
                       float(claims["exp"]))
