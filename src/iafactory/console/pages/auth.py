"""Signing in and out, choosing the tenant, the language, and accepting an invitation.

Each step calls the API's own handler (auth/endpoints.py): the same throttling, sessions, tenant
selection and audit as POST /api/v1/auth/login, /logout, /select-tenant and /accept-invitation.
"""

from __future__ import annotations

import psycopg
from fastapi import Response
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import ValidationError

from iafactory.auth import endpoints as auth_endpoints
from iafactory.auth import sessions
from iafactory.auth.dependencies import principal_cell, principal_from_token
from iafactory.auth.schemas import (
    AcceptInvitationIn,
    LoginIn,
    PasswordResetConfirmIn,
    PasswordResetIn,
    SelectTenantIn,
    VerifyEmailIn,
)
from iafactory.console import i18n
from iafactory.console import session as cookie
from iafactory.console.web import Ctx, layout_data, page, safe_next
from iafactory.http.problems import Problem


@page("GET", "/", role="viewer", api="GET /api/v1/tenant")
async def home(c: Ctx) -> Response:
    return c.redirect("/overview")


@page("GET", "/sign-in", role=None, signed_in=False)
async def sign_in_form(c: Ctx) -> Response:
    if c.who is not None:
        return c.redirect(safe_next(c.request.query_params.get("next")))
    return c.render("sign_in.html", next=safe_next(c.request.query_params.get("next")), email="", error=None)


@page("POST", "/sign-in", role=None, signed_in=False, api="POST /api/v1/auth/login")
async def sign_in(c: Ctx) -> Response:
    email, target = c.form.get("email", "").strip(), safe_next(c.form.get("next"))
    try:
        body = LoginIn(email=email, password=c.form.get("password", ""))
    except ValidationError:
        return c.render("sign_in.html", status=422, next=target, email=email, error=c.t("sign_in.invalid"))
    try:
        tokens = await auth_endpoints.login(body, c.request)
    except Problem as problem:
        message = {401: c.t("sign_in.wrong"), 429: c.t("sign_in.throttled")}.get(problem.status, problem.detail)
        response = c.render("sign_in.html", status=problem.status, next=target, email=email, error=message)
        response.headers.update(problem.headers)
        return response
    if c.who is not None:  # signed in already in this browser: that session ends
        await _end(c)
    c.signed_in_with(tokens)
    if tokens.tenant is None and target == "/console/":
        return c.redirect("/tenants")
    return c.redirect(target)


async def _end(c: Ctx) -> None:
    who = c.who
    if who is not None and who.user_id is not None and who.session_id is not None:
        await sessions.end(
            c.request.app.state.cells, principal_cell(c.request, who), who.user_id, who.session_id, "logout"
        )


@page("POST", "/sign-out", role=None, api="POST /api/v1/auth/logout")
async def sign_out(c: Ctx) -> Response:
    assert c.who is not None
    await auth_endpoints.logout(c.request, c.who)
    c.who, c.new_tokens, c.ended = None, None, True
    return c.redirect("/sign-in")


@page("GET", "/tenants", role=None, api="GET /api/v1/me/tenants")
async def tenants(c: Ctx) -> Response:
    return c.render("tenants.html")


@page("POST", "/tenants", role=None, api="POST /api/v1/auth/select-tenant")
async def switch_tenant(c: Ctx) -> Response:
    """Act for another of my tenants. Within the session's cell the session is kept (its refresh
    token replaced); a tenant of another cell gets a session there, and the console's previous
    one ends (the cookie holds one session)."""
    assert c.who is not None
    before = c.who
    try:
        body = SelectTenantIn(tenant=c.form.get("tenant", ""))
    except ValidationError:
        raise Problem(422, "Unprocessable Content", c.t("tenants.choose")) from None
    tokens = await auth_endpoints.select_tenant(body, c.request, before)
    after = principal_from_token(c.settings, tokens.access_token)
    if after.session_id != before.session_id:
        await _end(c)
    c.signed_in_with(tokens)
    return c.redirect("/overview")


@page("POST", "/language", role=None, signed_in=False)
async def language(c: Ctx) -> Response:
    code = c.form.get("lang", "")
    response = c.redirect(safe_next(c.form.get("next")))
    if code in i18n.LANGUAGES:
        response.set_cookie(
            i18n.LANG_COOKIE,
            code,
            max_age=365 * 86_400,
            path="/console",
            httponly=True,
            secure=cookie.secure(c.request),
            samesite="lax",
        )
    return response


async def _signed_in_email(c: Ctx) -> str | None:
    """The email of the person signed in to this browser, if their session still works."""
    if c.who is None:
        return None
    try:
        await layout_data(c)
    except (Problem, psycopg.Error):
        c.who, c.layout = None, None
        return None
    user = (c.layout or {}).get("user")
    return user.email if user is not None else None


@page("GET", "/accept-invitation", role=None, signed_in=False)
async def invitation_form(c: Ctx) -> Response:
    token = c.request.query_params.get("token", "")
    return c.render("accept_invitation.html", token=token, name="", error=None, signed_in=await _signed_in_email(c))


@page("POST", "/accept-invitation", role=None, signed_in=False, api="POST /api/v1/auth/accept-invitation")
async def accept_invitation(c: Ctx) -> Response:
    """As the signed-in account (button "join as ..."), or as a new person (name and password)."""
    token, name = c.form.get("token", ""), c.form.get("name", "").strip()
    password = c.form.get("password") or None
    signed_in_token = cookie.read(c.request)
    bearer = None
    if password is None and c.who is not None and signed_in_token is not None:
        access = c.new_tokens.access if c.new_tokens else signed_in_token.access
        bearer = HTTPAuthorizationCredentials(scheme="Bearer", credentials=access)
    try:
        body = AcceptInvitationIn(token=token, name=name or None, password=password)
    except ValidationError as err:
        message = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
        return c.render(
            "accept_invitation.html",
            status=422,
            token=token,
            name=name,
            error=message,
            signed_in=await _signed_in_email(c),
        )
    try:
        tokens = await auth_endpoints.accept_invitation(body, c.request, bearer)
    except Problem as problem:
        if problem.status == 401 and bearer is None:
            message = c.t("invitation.need_password")
        elif problem.status == 409 and bearer is None:
            message = c.t("invitation.sign_in_first")
        else:
            message = problem.detail or problem.title
        return c.render(
            "accept_invitation.html",
            status=problem.status,
            token=token,
            name=name,
            error=message,
            signed_in=await _signed_in_email(c),
        )
    if c.who is not None:  # the cookie holds one session: the one the invitation started replaces it
        await _end(c)
    c.signed_in_with(tokens)
    return c.redirect("/overview", done="joined")


# The links of the verification and reset emails open here. Opening a link changes nothing (mail
# scanners fetch links): the page's button or form posts the token to the API's own handler.


@page("GET", "/verify-email", role=None, signed_in=False)
async def verify_email_form(c: Ctx) -> Response:
    return c.render("verify_email.html", token=c.request.query_params.get("token", ""), verified=False, error=None)


@page("POST", "/verify-email", role=None, signed_in=False, api="POST /api/v1/auth/verify-email")
async def verify_email(c: Ctx) -> Response:
    token = c.form.get("token", "")
    try:
        await auth_endpoints.verify_email(VerifyEmailIn(token=token), c.request)
    except ValidationError:
        return c.render("verify_email.html", status=422, token=token, verified=False, error=c.t("link.no_token"))
    except Problem as problem:
        response = c.render(
            "verify_email.html", status=problem.status, token=token, verified=False, error=problem.detail
        )
        response.headers.update(problem.headers)
        return response
    return c.render("verify_email.html", token="", verified=True, error=None)


@page("GET", "/reset-password", role=None, signed_in=False)
async def reset_password_form(c: Ctx) -> Response:
    return c.render("reset_password.html", token=c.request.query_params.get("token", ""), done_reset=False, error=None)


@page("POST", "/reset-password", role=None, signed_in=False, api="POST /api/v1/auth/password-reset/confirm")
async def reset_password(c: Ctx) -> Response:
    token = c.form.get("token", "")
    try:
        body = PasswordResetConfirmIn(token=token, new_password=c.form.get("new_password", ""))
    except ValidationError as err:
        message = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
        return c.render("reset_password.html", status=422, token=token, done_reset=False, error=message)
    try:
        await auth_endpoints.confirm_password_reset(body, c.request)
    except Problem as problem:
        response = c.render(
            "reset_password.html", status=problem.status, token=token, done_reset=False, error=problem.detail
        )
        response.headers.update(problem.headers)
        return response
    return c.render("reset_password.html", token="", done_reset=True, error=None)


@page("POST", "/reset-password/request", role=None, signed_in=False, api="POST /api/v1/auth/password-reset")
async def request_reset(c: Ctx) -> Response:
    """Without a token (the account-exists email's link, or "forgot my password"): ask for a link.
    The same answer whether or not the email has an account, as the API's."""
    email = c.form.get("email", "").strip()
    try:
        body = PasswordResetIn(email=email)
    except ValidationError:
        return c.render("reset_password.html", status=422, token="", done_reset=False, error=c.t("sign_in.invalid"))
    try:
        await auth_endpoints.request_password_reset(body, c.request)
    except Problem as problem:
        response = c.render(
            "reset_password.html", status=problem.status, token="", done_reset=False, error=problem.detail
        )
        response.headers.update(problem.headers)
        return response
    return c.render("reset_password.html", token="", done_reset=False, requested=True, error=None)
