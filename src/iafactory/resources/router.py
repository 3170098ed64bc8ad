"""Routes for a Resource: create, get, list (cursor pages, newest first), update, delete.

No `from __future__ import annotations` here: the handlers' annotations refer to each resource's
own models, which FastAPI must see as real classes.
"""

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from iafactory.auth.dependencies import Member, Viewer
from iafactory.http.idempotency import Idempotent
from iafactory.http.problems import not_found
from iafactory.http.rendering import api_router
from iafactory.resources import pagination, repository
from iafactory.resources.pagination import DEFAULT_LIMIT, MAX_LIMIT, Page, cursor_param
from iafactory.resources.spec import Resource

# Documented next to the app-wide 401/403/422, so that clients (and schema-driven tests) know them.
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "No such record in this tenant (application/problem+json)"}
}
CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"description": "Conflicts with existing or dependent records (application/problem+json)"}
}


def _documented(*notes: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    return {code: {"description": f"{text} (application/problem+json)"} for code, text in notes}


def crud_router(spec: Resource) -> APIRouter:
    # The models come from the Resource at run time and FastAPI reads them from the annotations:
    # mypy cannot take a variable as a type, hence the valid-type/attr-defined ignores below.
    router = api_router(prefix=f"/{spec.name}", tags=[spec.tag])
    create_responses = {**CONFLICT, **_documented(*spec.write_responses, *spec.create_responses)}
    update_responses = {**NOT_FOUND, **CONFLICT, **_documented(*spec.write_responses)}
    Create, Update, Read, IdType = spec.create, spec.update, spec.read, spec.id_type  # noqa: N806
    ReadPage = Page[Read]  # type: ignore[valid-type]  # noqa: N806

    async def _wake(s: Any) -> None:
        # From the request's own session, delivered when it commits (never if it rolls back).
        if spec.wakes is not None:
            await s.tx.execute("SELECT pg_notify(%s, '')", (spec.wakes,))

    @router.post(
        "",
        status_code=201,
        response_model=Read,
        operation_id=f"create_{spec.operation_noun}",
        responses=create_responses,
        summary=f"Create a {spec.noun}",
    )
    async def create(body: Create, s: Member, idempotency: Idempotent) -> Any:  # type: ignore[valid-type]
        values = body.model_dump()  # type: ignore[attr-defined]
        await _wake(s)
        return await idempotency.create(
            s, lambda last: repository.insert(s.tx, spec, s.ctx.tenant_id, values, last=last)
        )

    @router.get(
        "",
        response_model=ReadPage,
        operation_id=f"list_{spec.operation_nouns}",
        summary=f"List {spec.nouns}, newest first",
    )
    async def list_(
        s: Viewer,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Page size")] = DEFAULT_LIMIT,
        cursor: cursor_param(IdType) = None,  # type: ignore[valid-type]
    ) -> Any:
        after = pagination.decode(cursor, IdType) if cursor else None
        rows = await repository.page(s.tx, spec, s.ctx.tenant_id, limit, after)
        items, next_cursor = pagination.page_of(rows, limit)
        return {"items": items, "next_cursor": next_cursor}

    @router.get(
        "/{item_id}",
        response_model=Read,
        operation_id=f"get_{spec.operation_noun}",
        responses=NOT_FOUND,
        summary=f"Get a {spec.noun}",
    )
    async def get(item_id: IdType, s: Viewer) -> Any:  # type: ignore[valid-type]
        row = await repository.get(s.tx, spec, s.ctx.tenant_id, item_id)
        if row is None:
            raise not_found(spec.noun, item_id)
        return row

    @router.patch(
        "/{item_id}",
        response_model=Read,
        operation_id=f"update_{spec.operation_noun}",
        responses=update_responses,
        summary=f"Update a {spec.noun}",
    )
    async def update(item_id: IdType, body: Update, s: Member) -> Any:  # type: ignore[valid-type]
        changes = body.model_dump(exclude_unset=True)  # type: ignore[attr-defined]
        await _wake(s)
        row = await repository.update(s.tx, spec, s.ctx.tenant_id, item_id, changes, last=True)
        if row is None:
            raise not_found(spec.noun, item_id)
        return row

    @router.delete(
        "/{item_id}",
        status_code=204,
        response_class=Response,
        operation_id=f"delete_{spec.operation_noun}",
        responses={**NOT_FOUND, **CONFLICT},
        summary=f"Delete a {spec.noun}",
    )
    async def delete(item_id: IdType, s: Member) -> Response:  # type: ignore[valid-type]
        if not await repository.delete(s.tx, spec, s.ctx.tenant_id, item_id, last=True):
            raise not_found(spec.noun, item_id)
        return Response(status_code=204)

    return router
