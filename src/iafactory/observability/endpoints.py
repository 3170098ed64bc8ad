"""GET /metrics (Prometheus text format), outside /api/v1 and outside the OpenAPI document.

Who may read it: with IAFACTORY_METRICS_TOKEN set, whoever sends `Authorization: Bearer <token>`;
without it, only a loopback peer whose request came through no proxy (a reverse proxy on the same
host adds X-Forwarded-For / Forwarded, and then the token is needed). The figures carry no tenant
ids, but route and plan counts still describe the business: not for the public.
"""

from __future__ import annotations

import hmac
import ipaddress

from fastapi import APIRouter, Request, Response

from iafactory.config import Settings
from iafactory.http.problems import Problem
from iafactory.observability import metrics

router = APIRouter(include_in_schema=False)


def _loopback(request: Request) -> bool:
    host = request.client.host if request.client else None
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_access(request: Request) -> None:
    settings: Settings = request.app.state.settings
    if settings.metrics_token is not None:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        expected = settings.metrics_token.get_secret_value().encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), expected):
            raise Problem(
                401,
                "Unauthorized",
                "send 'Authorization: Bearer <IAFACTORY_METRICS_TOKEN>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return
    proxied = "x-forwarded-for" in request.headers or "forwarded" in request.headers
    if proxied or not _loopback(request):
        raise Problem(
            403,
            "Forbidden",
            "/metrics answers loopback clients only; set IAFACTORY_METRICS_TOKEN to scrape it from elsewhere",
        )


@router.get("/metrics")
async def prometheus_metrics(request: Request) -> Response:
    check_access(request)
    db = request.app.state.db
    metrics.update_pool(db.pool_stats())
    jobs = await metrics.job_queue_stats(db)
    return Response(metrics.render(jobs), media_type=metrics.CONTENT_TYPE)
