"""The console's cookie session and its CSRF tokens.

The session *is* an API session (auth/sessions.py): signing in to the console calls the API's own
sign-in, which starts a session (a refresh-token family) in the account's cell. The cookie
`iaf_console` carries that session's access token and refresh token, `HttpOnly` (no script can
read it), `SameSite=Lax`, `Path=/console` (never sent to /api, which reads no cookie anyway), and
`Secure` when the request came over https or the public URL is https. Why the tokens rather than
a server-side session id: the server-side state already exists (app.sessions, with rotation,
idle and absolute expiry, logout and logout-all, reuse detection), and every request is then
checked exactly as an API request is (the access token's signature, its `sid` re-checked by
app.authorize in the request's own transaction). A second session table would be a second path
to the same decisions. When the access token has expired, the refresh token is spent for a new
pair (the API's own /auth/refresh code) and the cookie replaced on the answer; concurrent
requests of one process that carry the same expired pair share one refresh (a refresh token used
twice would end the session).

CSRF: a synchronizer token tied to the session without storing it, HMAC(key, "sid:" + session id),
in a hidden `csrf` field of every form and checked on every POST. Before sign-in (the sign-in and
invitation forms) there is no session: the token is then tied to a random `iaf_console_anon`
cookie (signed double submit). The key is derived from the JWT secret under its own label.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request, Response

from iafactory.config import Settings

COOKIE = "iaf_console"
ANON_COOKIE = "iaf_console_anon"
PATH = "/console"
SEPARATOR = "~"  # in neither a JWT nor a refresh token
REFRESH_SHARE_SECONDS = 30.0  # how long a concurrent request may reuse a refresh's answer
_CSRF_LABEL = b"iafactory-console-csrf"


@dataclass
class Tokens:
    access: str
    refresh: str

    def value(self) -> str:
        return f"{self.access}{SEPARATOR}{self.refresh}"


def read(request: Request) -> Tokens | None:
    raw = request.cookies.get(COOKIE)
    if not raw or SEPARATOR not in raw:
        return None
    access, _, refresh = raw.partition(SEPARATOR)
    return Tokens(access, refresh) if access and refresh else None


def secure(request: Request) -> bool:
    settings: Settings = request.app.state.settings
    return request.url.scheme == "https" or settings.public_url.startswith("https://")


def store(request: Request, response: Response, tokens: Tokens) -> None:
    settings: Settings = request.app.state.settings
    response.set_cookie(
        COOKIE,
        tokens.value(),
        max_age=settings.refresh_token_idle_seconds,
        path=PATH,
        httponly=True,
        secure=secure(request),
        samesite="lax",
    )


def clear(request: Request, response: Response) -> None:
    response.delete_cookie(COOKIE, path=PATH, httponly=True, secure=secure(request), samesite="lax")


def anon_nonce(request: Request) -> tuple[str, bool]:
    """The pre-session nonce of this browser, and whether it is new (then set it on the answer)."""
    nonce = request.cookies.get(ANON_COOKIE)
    if nonce and 20 <= len(nonce) <= 64:
        return nonce, False
    return secrets.token_urlsafe(24), True


def store_anon(request: Request, response: Response, nonce: str) -> None:
    response.set_cookie(ANON_COOKIE, nonce, path=PATH, httponly=True, secure=secure(request), samesite="lax")


def csrf_token(settings: Settings, binding: str) -> str:
    key = hmac.new(settings.secret("jwt_secret").encode(), _CSRF_LABEL, hashlib.sha256).digest()
    mac = hmac.new(key, binding.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode().rstrip("=")


def csrf_ok(settings: Settings, binding: str, presented: str | None) -> bool:
    return bool(presented) and hmac.compare_digest(csrf_token(settings, binding), presented or "")


@dataclass
class RefreshShare:
    """One refresh per refresh token in this process: concurrent requests await the same one."""

    running: dict[str, asyncio.Future[Any]] = field(default_factory=dict)
    done: dict[str, tuple[float, Any]] = field(default_factory=dict)

    async def once(self, token: str, spend: Any) -> Any:
        now = time.monotonic()
        for old in [t for t, (until, _) in self.done.items() if until < now]:
            del self.done[old]
        if token in self.done:
            return self.done[token][1]
        if token in self.running:
            return await asyncio.shield(self.running[token])
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.running[token] = future
        try:
            result = await spend()
        except BaseException as err:
            future.set_exception(err)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        finally:
            del self.running[token]
        future.set_result(result)
        self.done[token] = (now + REFRESH_SHARE_SECONDS, result)
        return result
