"""Members and invitations: list, invite with a role, change a role, remove, resend, revoke.

Every action is the API's handler (tenancy/endpoints.py) called with a tenant session opened at
the API's role for it: members are listed to viewers, invitations and every change to admins
(only an owner makes or changes owners: the service's own rule).
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from fastapi import Response
from pydantic import ValidationError

from iafactory.console.web import Ctx, page
from iafactory.http.idempotency import Idempotency
from iafactory.http.problems import Problem, not_found
from iafactory.tenancy import endpoints as tenancy_endpoints
from iafactory.tenancy.schemas import InvitationCreate, MemberUpdate

ROLES = ("viewer", "member", "admin", "owner")
DONE = frozenset({"invited", "role_changed", "removed", "resent", "revoked"})
MAX_USER_ID = 2**31 - 1


async def view(
    c: Ctx, *, status: int = 200, error: str | None = None, email: str = "", role: str = "member"
) -> Response:
    async with c.tenant(read_only=True, role="viewer") as s:
        members = await tenancy_endpoints.list_members(s)
    invitations: list[dict[str, Any]] = []
    if c.can("admin"):
        async with c.tenant(read_only=True, role="admin") as s:
            invitations = await tenancy_endpoints.list_invitations(s)
    done = c.request.query_params.get("done")
    return c.render(
        "members.html",
        status=status,
        title=c.t("members.title"),
        members=members,
        invitations=invitations,
        roles=ROLES,
        error=error,
        done=done if done in DONE else None,
        email=email,
        role=role,
        me=c.who.user_id if c.who else None,
    )


@page("GET", "/members", role="viewer", api="GET /api/v1/members")
async def members_page(c: Ctx) -> Response:
    return await view(c)


async def _refused(c: Ctx, problem: Problem, **form: str) -> Response:
    if problem.status in (401, 403):  # the framework's pages: sign in again, or not allowed
        raise problem
    return await view(c, status=problem.status, error=problem.detail or problem.title, **form)


def _member_id(c: Ctx) -> int:
    user_id = int(c.request.path_params["user_id"])
    if user_id < 1 or user_id > MAX_USER_ID:
        raise not_found("member", user_id)
    return user_id


@page("POST", "/members/invite", role="admin", api="POST /api/v1/members/invitations")
async def invite(c: Ctx) -> Response:
    email, role = c.form.get("email", "").strip(), c.form.get("role", "member")
    try:
        body = InvitationCreate(email=email, role=role)
    except ValidationError:
        return await view(c, status=422, error=c.t("members.invalid_invitation"), email=email, role=role)
    try:
        async with c.tenant() as s:
            await tenancy_endpoints.create_invitation(body, c.request, s, Idempotency(None, c.request))
    except Problem as problem:
        return await _refused(c, problem, email=email, role=role)
    return c.redirect("/members", done="invited")


@page(
    "POST",
    "/members/{user_id:int}/role",
    role="admin",
    api="PATCH /api/v1/members/{user_id}",
    params={"user_id": "member"},
)
async def change_role(c: Ctx) -> Response:
    user_id = _member_id(c)
    try:
        body = MemberUpdate(role=c.form.get("role", ""))
    except ValidationError:
        return await view(c, status=422, error=c.t("members.invalid_role"))
    try:
        async with c.tenant() as s:
            await tenancy_endpoints.change_member(user_id, body, s)
    except Problem as problem:
        return await _refused(c, problem)
    return c.redirect("/members", done="role_changed")


@page(
    "POST",
    "/members/{user_id:int}/remove",
    role="admin",
    api="DELETE /api/v1/members/{user_id}",
    params={"user_id": "member"},
)
async def remove(c: Ctx) -> Response:
    user_id = _member_id(c)
    try:
        async with c.tenant() as s:
            await tenancy_endpoints.remove_member(user_id, s)
    except Problem as problem:
        return await _refused(c, problem)
    return c.redirect("/members", done="removed")


@page(
    "POST",
    "/invitations/{invitation_id:uuid}/resend",
    role="admin",
    api="POST /api/v1/members/invitations/{invitation_id}/resend",
    params={"invitation_id": "invitation"},
)
async def resend(c: Ctx) -> Response:
    invitation_id: UUID = c.request.path_params["invitation_id"]
    try:
        async with c.tenant() as s:
            await tenancy_endpoints.resend_invitation(invitation_id, c.request, s)
    except Problem as problem:
        return await _refused(c, problem)
    return c.redirect("/members", done="resent")


@page(
    "POST",
    "/invitations/{invitation_id:uuid}/revoke",
    role="admin",
    api="DELETE /api/v1/members/invitations/{invitation_id}",
    params={"invitation_id": "invitation"},
)
async def revoke(c: Ctx) -> Response:
    invitation_id: UUID = c.request.path_params["invitation_id"]
    try:
        async with c.tenant() as s:
            await tenancy_endpoints.revoke_invitation(invitation_id, c.request, s)
    except Problem as problem:
        return await _refused(c, problem)
    return c.redirect("/members", done="revoked")
