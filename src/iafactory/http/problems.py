"""Every 4xx and 5xx as RFC 9457 `application/problem+json`. No stack trace or SQL text ever
reaches a client: database errors are mapped to a status and a sentence written here."""

from __future__ import annotations

import logging
import re
from collections.abc import MutableMapping
from http import HTTPStatus
from typing import Any

import psycopg
from fastapi import FastAPI, Request, routing
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles

from iafactory.admission import Busy, ClientGone, Unavailable

log = logging.getLogger("iafactory.http")

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://docs.iafactory.ch/problems/"

# SQLSTATEs raised by our own SQL (app.authorize and friends) → HTTP status.
APP_SQLSTATES = {"IA401": 401, "IA402": 402, "IA403": 403, "IA404": 404, "IA409": 409, "IA429": 429, "IA503": 503}


class Problem(Exception):
    """Raise to answer with a problem document."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str | None = None,
        *,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail or title)
        self.status, self.title, self.detail, self.type_ = status, title, detail, type_
        self.headers = headers or {}
        self.extra = extra


def invalid(field: str, message: str, type_: str = "value_error") -> Problem:
    """A 422 naming `field` ("query.from", "body.name"), shaped like FastAPI's own validation errors."""
    return Problem(
        422,
        "Validation failed",
        f"{field}: {message}",
        type_="validation",
        errors=[{"field": field, "message": message, "type": type_}],
    )


def not_found(what: str, ident: object) -> Problem:
    # Identical for "does not exist" and "belongs to another tenant": nothing to learn from it.
    return Problem(404, "Not Found", f"{what} {ident} not found", type_="not-found")


def problem_response(
    status: int,
    title: str,
    detail: str | None = None,
    *,
    type_: str | None = None,
    headers: dict[str, str] | None = None,
    request: Request | None = None,
    **extra: Any,
) -> JSONResponse:
    body: dict[str, Any] = {"type": TYPE_BASE + type_ if type_ else "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    if request is not None:
        body["instance"] = request.url.path
        rid = getattr(request.state, "request_id", None)
        if rid:
            body["request_id"] = rid
    body.update(extra)
    if status == 422 and "errors" not in body:
        # Every 422 has the same shape: clients read `errors`. A raiser that names no field
        # (a database refusal of a value we cannot trace to one) blames the request body.
        body["errors"] = [{"field": "body", "message": detail or title, "type": "value_error"}]
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def busy_response(retry_after: int, request: Request | None = None) -> JSONResponse:
    """503 for load: the service is up, it is only full right now."""
    return problem_response(
        503,
        "Service Unavailable",
        f"busy, retry after {retry_after} s",
        type_="busy",
        headers={"Retry-After": str(retry_after)},
        request=request,
    )


def unavailable_response(
    what: str, reason: str, retry_after: int = 1, request: Request | None = None, **extra: Any
) -> JSONResponse:
    """503 because something this service needs (the database) does not answer."""
    return problem_response(
        503,
        "Service Unavailable",
        f"{what} unavailable: {reason}",
        type_=f"{what}-unavailable",
        headers={"Retry-After": str(retry_after)},
        request=request,
        **extra,
    )


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        where, rest = parts[0], parts[1:]
        return f"{where}.{'.'.join(rest)}" if rest else where
    return ".".join(parts)


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(
            exc.status, exc.title, exc.detail, type_=exc.type_, headers=exc.headers, request=request, **exc.extra
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"field": _field(e["loc"]), "message": e["msg"].removeprefix("Value error, "), "type": e["type"]}
            for e in exc.errors()
        ]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return problem_response(422, "Validation failed", detail, type_="validation", request=request, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        titles = {
            404: "Not Found",
            405: "Method Not Allowed",
            401: "Unauthorized",
            403: "Forbidden",
            413: "Content Too Large",
        }
        detail = exc.detail if isinstance(exc.detail, str) else None
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            # The router names only the methods of the first route whose path matched; RFC 9110
            # wants every method the resource supports.
            methods = allowed_methods(request.app.routes, request.scope)
            if methods:
                headers = {**(headers or {}), "Allow": ", ".join(methods)}
        return problem_response(
            exc.status_code,
            titles.get(exc.status_code) or _phrase(exc.status_code),
            detail,
            headers=headers,
            request=request,
        )

    @app.exception_handler(Busy)
    async def _busy(request: Request, exc: Busy) -> JSONResponse:
        return busy_response(exc.retry_after, request)

    @app.exception_handler(Unavailable)
    async def _unavailable(request: Request, exc: Unavailable) -> JSONResponse:
        return unavailable_response(exc.what, exc.reason, exc.retry_after, request)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone) -> JSONResponse:
        # Nobody is listening; 499 ("client closed request") is what the access log shows.
        return problem_response(
            499, "Client Closed Request", "the client disconnected while the request waited", request=request
        )

    @app.exception_handler(psycopg.Error)
    async def _database(request: Request, exc: psycopg.Error) -> JSONResponse:
        fields: list[str] = []
        if (
            isinstance(exc, (psycopg.errors.ForeignKeyViolation, psycopg.errors.CheckViolation))
            and exc.diag.constraint_name
        ):
            fields = await _constraint_columns(request, exc.diag.constraint_name)
        return database_problem(request, exc, fields=fields)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        from iafactory.http.security import json_answer_headers

        return problem_response(
            500,
            "Internal Server Error",
            "an unexpected error occurred; it has been logged",
            request=request,
            headers=json_answer_headers(request.url.path),
        )


_METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")


def _route_table(routes: list[BaseRoute]) -> list[Any]:
    """Every route of the app, with included routers expanded (FastAPI >= 0.13x includes them lazily)."""
    expand = getattr(routing, "iter_route_contexts", None)
    return list(expand(routes)) if expand is not None else list(routes)


def allowed_methods(routes: list[BaseRoute], scope: MutableMapping[str, Any]) -> list[str]:
    """The methods of every route of the request's path, in a conventional order. Where routes with
    fewer path parameters match (/knowledge-base/search beside /knowledge-base/{item_id}), the
    path is theirs, as the OpenAPI document says."""
    path = scope.get("route_path") or scope["path"].removeprefix(scope.get("root_path", "") or "")
    found: dict[int, set[str]] = {}
    for route in _route_table(routes):
        regex = getattr(route, "path_regex", None)
        if regex is None or not regex.match(path):
            continue
        params = len(getattr(route, "param_convertors", None) or ())
        if isinstance(route, Mount) or isinstance(getattr(route, "route", None), Mount):
            if isinstance(getattr(route, "app", None), StaticFiles):
                found.setdefault(params, set()).update({"GET", "HEAD"})
            continue
        found.setdefault(params, set()).update(getattr(route, "methods", None) or ())
    methods = found[min(found)] if found else set()
    return sorted(methods, key=lambda m: (_METHOD_ORDER.index(m) if m in _METHOD_ORDER else len(_METHOD_ORDER), m))


_constraint_cache: dict[str, list[str]] = {}


async def _constraint_columns(request: Request, constraint: str) -> list[str]:
    """The columns of a foreign key or check constraint, without tenant_id. With RLS on the
    referenced table PostgreSQL leaves the key out of the error detail, and a check violation names
    no column at all, so the catalog says which field was wrong."""
    if constraint not in _constraint_cache:
        try:
            async with request.app.state.db.anonymous(read_only=True) as tx:
                rows = await tx.fetch(
                    """SELECT a.attname FROM pg_constraint c
                       CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY k(n, i)
                       JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n
                       WHERE c.conname = %s AND c.contype IN ('f', 'c') ORDER BY k.i""",
                    (constraint,),
                )
        except psycopg.Error:
            return []
        _constraint_cache[constraint] = [r["attname"] for r in rows if r["attname"] != "tenant_id"]
    return _constraint_cache[constraint]


def _field_errors(fields: list[str], message: str, type_: str) -> list[dict[str, str]]:
    return [{"field": f"body.{f}", "message": message, "type": type_} for f in fields]


def database_problem(request: Request, exc: psycopg.Error, fields: list[str] | None = None) -> JSONResponse:
    state = exc.sqlstate or ""
    diag = exc.diag
    if state in APP_SQLSTATES:
        status = APP_SQLSTATES[state]
        titles = {
            401: "Unauthorized",
            402: "Payment Required",
            403: "Forbidden",
            404: "Not Found",
            409: "Conflict",
            429: "Too Many Requests",
            503: "Service Unavailable",
        }
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        detail = diag.message_detail or ""
        if status in (429, 503) and detail.startswith("retry_after="):
            headers = {"Retry-After": detail.removeprefix("retry_after=")}
        extra: dict[str, Any] = {"limit": detail.removeprefix("limit=")} if detail.startswith("limit=") else {}
        # DETAIL 'type=<kind>': the problem type a client tells this refusal by (e.g. email-not-verified).
        kind = detail.removeprefix("type=") if detail.startswith("type=") else None
        return problem_response(
            status, titles[status], diag.message_primary, type_=kind, headers=headers, request=request, **extra
        )
    if isinstance(exc, psycopg.errors.UniqueViolation):
        return problem_response(
            409,
            "Conflict",
            _constraint_sentence(diag.constraint_name, "already exists"),
            type_="conflict",
            request=request,
        )
    still_referenced = isinstance(exc, psycopg.errors.RestrictViolation) or (
        isinstance(exc, psycopg.errors.ForeignKeyViolation)
        and (diag.message_primary or "").startswith("update or delete")
    )
    if still_referenced:
        # PostgreSQL 18 reports ON DELETE RESTRICT as 23001, earlier versions as 23503.
        return problem_response(
            409,
            "Conflict",
            _constraint_sentence(diag.constraint_name, "it is still referenced by other records"),
            type_="conflict",
            request=request,
        )
    if isinstance(exc, psycopg.errors.ForeignKeyViolation):
        # The referenced record does not exist *in this tenant*: bad input, named by its field.
        errors = _field_errors(fields or _fk_fields(diag.message_detail), "no such record", "reference")
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "references a record that does not exist"
        return problem_response(422, "Validation failed", detail, type_="validation", request=request, errors=errors)
    if isinstance(
        exc,
        (
            psycopg.errors.CheckViolation,
            psycopg.errors.NotNullViolation,
            psycopg.errors.StringDataRightTruncation,
            psycopg.errors.NumericValueOutOfRange,
            psycopg.errors.InvalidTextRepresentation,
            psycopg.errors.InvalidDatetimeFormat,
            psycopg.errors.DatetimeFieldOverflow,
        ),
    ):
        detail = _constraint_sentence(diag.constraint_name or diag.column_name, "invalid value")
        named = fields or ([diag.column_name] if diag.column_name else [])
        extra = {"errors": _field_errors(named, detail, "constraint")} if named else {}
        return problem_response(422, "Validation failed", detail, type_="validation", request=request, **extra)
    if isinstance(exc, psycopg.errors.DataError):
        # e.g. a NUL character in text, a number out of range: the value, not the server, is wrong.
        extra = (
            {"errors": _field_errors([diag.column_name], "invalid value", "value_error")} if diag.column_name else {}
        )
        return problem_response(
            422,
            "Validation failed",
            f"invalid value: {diag.message_primary}",
            type_="validation",
            request=request,
            **extra,
        )
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        # An RLS refusal that slipped past the API's own checks: the row is not the caller's.
        return problem_response(403, "Forbidden", "not allowed for this tenant", request=request)
    if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
        log.error("write attempted in a read-only request: %s %s", request.method, request.url.path)
    elif isinstance(exc, psycopg.OperationalError):
        return _operational(request, exc)
    log.error("database error on %s %s: %s %s", request.method, request.url.path, state, diag.message_primary)
    return problem_response(
        500, "Internal Server Error", "an unexpected error occurred; it has been logged", request=request
    )


def _operational(request: Request, exc: psycopg.OperationalError) -> JSONResponse:
    """A 503 that says what happened: the database went away, or it was only busy."""
    state = exc.sqlstate or ""
    lost = exc.pgconn is None or exc.pgconn.status != psycopg.pq.ConnStatus.OK
    if lost or state.startswith(("57P", "08")):
        # Connection lost, server shutting down or restarting: the database is not there.
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
        return unavailable_response("database", "connection lost", request=request)
    if state.startswith(("40", "53")) or state in ("57014", "55P03"):
        # Serialization failure, deadlock, out of resources, statement or lock timeout: retry.
        log.warning("database busy on %s %s: %s %s", request.method, request.url.path, state, exc.diag.message_primary)
        return busy_response(1, request)
    log.error("database error on %s %s: %s %s", request.method, request.url.path, state, exc.diag.message_primary)
    return problem_response(
        500, "Internal Server Error", "an unexpected error occurred; it has been logged", request=request
    )


def _fk_fields(detail: str | None) -> list[str]:
    """Columns named in 'Key (tenant_id, lead_id)=(...) is not present', without tenant_id."""
    match = re.match(r"Key \(([^)]*)\)=", detail or "")
    if not match:
        return []
    return [c.strip() for c in match.group(1).split(",") if c.strip() != "tenant_id"]


def _phrase(status: int) -> str:
    """The standard reason phrase ("Bad Request" for an unparseable body), not a vague "Error"."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _constraint_sentence(name: str | None, what: str) -> str:
    return f"{what} ({name})" if name else what
