"""Security headers on every answer.

* `X-Content-Type-Options: nosniff`, `X-Frame-Options: DENY`, `Referrer-Policy: no-referrer`.
* `Content-Security-Policy`: JSON answers get `default-src 'none'; frame-ancestors 'none'` (nothing
  in them may run or load anything). HTML answers are the API documentation pages (Swagger UI,
  ReDoc), served from this origin: they may load scripts, styles, images and fonts from 'self'
  and run the small inline bits those pages are made of, fetch /openapi.json, and start ReDoc's
  blob: worker; nothing from another origin, and they cannot be framed either.
* `Strict-Transport-Security` when the request came over https: TLS on this server, or a proxy's
  `X-Forwarded-Proto: https` that uvicorn trusted (`--forwarded-allow-ips`, 127.0.0.1 by default).
  Over plain http it would be ignored by browsers, and sending it from a development server on
  localhost would pin that name to https.
* `Cache-Control: no-store` on every /api answer: tokens, API keys and tenant data must not stay
  in a browser's or a proxy's cache.

Headers the application set itself are left as they are.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

API_CSP = b"default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
DOCS_CSP = (
    b"default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    b"img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
    b"frame-ancestors 'none'; base-uri 'self'; form-action 'self'; object-src 'none'"
)
COMMON = ((b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer"))


def json_answer_headers(path: str) -> dict[str, str]:
    """The headers above for a JSON answer sent outside this middleware: Starlette answers an
    unhandled exception from its outermost layer (ServerErrorMiddleware), after ours."""
    headers = {name.decode(): value.decode() for name, value in COMMON}
    headers["content-security-policy"] = API_CSP.decode()
    if path.startswith("/api/"):
        headers["cache-control"] = "no-store"
    return headers


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp, hsts_max_age: int = 31_536_000) -> None:
        self.app = app
        self.hsts = f"max-age={hsts_max_age}".encode() if hsts_max_age > 0 else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        https = scope.get("scheme") == "https"
        api = scope["path"].startswith("/api/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.setdefault("headers", [])
                present, html = set(), False
                for name, value in headers:
                    name = name.lower()
                    present.add(name)
                    html = html or (name == b"content-type" and value.startswith(b"text/html"))
                added = [h for h in COMMON if h[0] not in present]
                if b"content-security-policy" not in present:
                    added.append((b"content-security-policy", DOCS_CSP if html else API_CSP))
                if https and self.hsts is not None and b"strict-transport-security" not in present:
                    added.append((b"strict-transport-security", self.hsts))
                if api and b"cache-control" not in present:
                    added.append((b"cache-control", b"no-store"))
                message["headers"] = [*headers, *added]
            await send(message)

        await self.app(scope, receive, send_with_headers)
