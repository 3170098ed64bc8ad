"""Access tokens: HS256 JWTs with issuer, audience and expiry, verified strictly.

Every token names its signing key in the `kid` header (a digest of the key, not the key). The
current key signs; the previous one (IAFACTORY_JWT_PREVIOUS_SECRET) still verifies until
IAFACTORY_JWT_PREVIOUS_SECRET_EXPIRES_AT, so a key can be rotated without signing everyone out.
A token whose key is unknown or retired, that lacks `iat`, claims to be issued in the future or
lives longer than IAFACTORY_JWT_MAX_TOKEN_LIFETIME_SECONDS is refused, whatever its `exp` says.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

import jwt

from iafactory.config import Settings, previous_key_expiry

ALGORITHM = "HS256"
LEEWAY_SECONDS = 5


class InvalidToken(Exception):
    pass


@dataclass(frozen=True)
class TokenClaims:
    user_id: int
    tenant_id: uuid.UUID | None
    role: str | None
    platform_admin: bool
    expires_at: float = 0.0
    # The cell holding the user `user_id` (and the tenant): None in tokens from before cells.
    cell: str | None = None
    # A person with accounts in several cells: (cell, user id) of each, for select-tenant.
    accounts: tuple[tuple[str, int], ...] = ()
    # The session (refresh-token family) the token belongs to; the request gate checks it is
    # still alive. None in tokens from before sessions.
    session_id: uuid.UUID | None = None


@dataclass(frozen=True)
class SigningKey:
    kid: str
    secret: str
    retires_at: float | None = None  # None: the current key


@dataclass(frozen=True)
class Keyring:
    current: SigningKey
    previous: SigningKey | None

    def find(self, kid: object) -> SigningKey | None:
        for key in (self.current, self.previous):
            if key is not None and key.kid == kid:
                return key
        return None


def key_id(secret: str) -> str:
    """A public name for a key: a digest, so the header tells which key without telling the key."""
    return hashlib.sha256(b"iafactory-jwt-kid\0" + secret.encode()).hexdigest()[:16]


@lru_cache(maxsize=8)
def _keyring(current: str, previous: str | None, retires_at: float | None) -> Keyring:
    old = None
    if previous is not None and previous != current:
        old = SigningKey(key_id(previous), previous, retires_at if retires_at is not None else 0.0)
    return Keyring(SigningKey(key_id(current), current), old)


def keyring(settings: Settings) -> Keyring:
    previous = settings.jwt_previous_secret.get_secret_value() if settings.jwt_previous_secret else None
    return _keyring(settings.secret("jwt_secret"), previous, previous_key_expiry(settings))


def issue(
    settings: Settings,
    user_id: int,
    *,
    tenant_id: uuid.UUID | None = None,
    role: str | None = None,
    platform_admin: bool = False,
    cell: str | None = None,
    accounts: dict[str, int] | None = None,
    session_id: uuid.UUID | None = None,
) -> tuple[str, int]:
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
    if cell is not None:
        claims["cell"] = cell
    if accounts and len(accounts) > 1:
        claims["accounts"] = accounts
    if session_id is not None:
        claims["sid"] = str(session_id)
    key = keyring(settings).current
    return jwt.encode(claims, key.secret, algorithm=ALGORITHM, headers={"kid": key.kid}), ttl


# Verified tokens, until they expire: checking a signature and parsing the claims on every
# request cost more than the request's SQL. Revocation does not depend on this cache: membership,
# role, tenant status and the token's session are re-checked in the database on every request.
_VERIFIED: OrderedDict[tuple[Keyring, str, str, int, str], tuple[float, TokenClaims]] = OrderedDict()
_VERIFIED_MAX = 10_000


def verify(settings: Settings, token: str) -> TokenClaims:
    ring = keyring(settings)
    key = (ring, settings.jwt_audience, settings.jwt_issuer, settings.jwt_max_token_lifetime_seconds, token)
    hit = _VERIFIED.get(key)
    if hit is not None:
        if hit[0] > time.time():
            return hit[1]
        del _VERIFIED[key]
        raise InvalidToken("token has expired")
    claims, signer = _verify(settings, ring, token)
    # A token signed with the previous key is only good until that key retires.
    until = claims.expires_at if signer.retires_at is None else min(claims.expires_at, signer.retires_at)
    _VERIFIED[key] = (until, claims)
    if len(_VERIFIED) > _VERIFIED_MAX:
        _VERIFIED.popitem(last=False)
    return claims


def _verify(settings: Settings, ring: Keyring, token: str) -> tuple[TokenClaims, SigningKey]:
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.InvalidTokenError as err:
        raise InvalidToken("invalid token") from err
    signer = ring.find(kid)
    if signer is None:
        raise InvalidToken("token was signed with an unknown key: sign in again")
    now = time.time()
    if signer.retires_at is not None and now >= signer.retires_at:
        raise InvalidToken("token was signed with a retired key: sign in again")
    try:
        claims = jwt.decode(
            token,
            signer.secret,
            algorithms=[ALGORITHM],  # never "none", never an algorithm the token picks
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            options={"require": ["exp", "iat", "sub", "iss", "aud"]},
            leeway=LEEWAY_SECONDS,
        )
    except jwt.ExpiredSignatureError as err:
        raise InvalidToken("token has expired") from err
    except jwt.ImmatureSignatureError as err:
        raise InvalidToken("token is not valid yet (issued in the future)") from err
    except jwt.InvalidAudienceError as err:
        raise InvalidToken("token is for another audience") from err
    except jwt.InvalidSignatureError as err:
        raise InvalidToken("token signature is invalid") from err
    except jwt.InvalidTokenError as err:
        raise InvalidToken("invalid token") from err
    try:
        lifetime = float(claims["exp"]) - float(claims["iat"])
        user_id = int(claims["sub"])
        tenant_id = uuid.UUID(claims["tenant_id"]) if claims.get("tenant_id") else None
        cell = claims.get("cell")
        if cell is not None and not isinstance(cell, str):
            raise TypeError("cell")
        accounts = tuple(sorted((str(c), int(u)) for c, u in (claims.get("accounts") or {}).items()))
        session_id = uuid.UUID(claims["sid"]) if claims.get("sid") else None
    except (ValueError, TypeError, AttributeError) as err:
        raise InvalidToken("invalid token: malformed claims") from err
    if lifetime > settings.jwt_max_token_lifetime_seconds:
        raise InvalidToken(f"token lifetime exceeds the maximum of {settings.jwt_max_token_lifetime_seconds} s")
    return TokenClaims(
        user_id,
        tenant_id,
        claims.get("role"),
        bool(claims.get("platform_admin")),
        float(claims["exp"]),
        cell,
        accounts,
        session_id,
    ), signer
