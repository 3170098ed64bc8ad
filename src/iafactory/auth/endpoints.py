"""/api/v1/auth/*, /api/v1/me* and /api/v1/api-keys."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from iafactory.admission import ANONYMOUS
from iafactory.audit import service as audit
from iafactory.auth import api_keys, passwords, policy, resets, service, sessions, throttle, verification
from iafactory.auth.dependencies import (
    Admin,
    BearerCredential,
    CurrentPrincipal,
    Principal,
    UserPrincipal,
    Viewer,
    accounts_of,
    check_session,
    client_ip,
    principal_cell,
    principal_from_token,
    session_gate,
    tenant_context,
)
from iafactory.auth.schemas import (
    AcceptInvitationIn,
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyOut,
    LoginIn,
    Membership,
    MeOut,
    MyTenant,
    PasswordChangeIn,
    PasswordResetConfirmIn,
    PasswordResetIn,
    PasswordResetOut,
    RefreshIn,
    RegisterIn,
    RegisterOut,
    SelectTenantIn,
    SessionOut,
    TokenOut,
    VerifyEmailIn,
    VerifyEmailResendOut,
)
from iafactory.cells import directory
from iafactory.cells.routing import CellPools
from iafactory.config import Settings
from iafactory.http.idempotency import Idempotent
from iafactory.http.problems import Problem, invalid, not_found
from iafactory.http.rendering import api_router
from iafactory.tenancy import invitations

router = api_router()  # tags per route: an operation listed under two tags shows twice in /docs


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _login_throttle(request: Request) -> throttle.Throttle:
    """Redis when the rate limiter uses it, else PostgreSQL: the directory when there are cells
    (the counters name nobody: HMACs), else the one database."""
    pools: CellPools = request.app.state.cells
    limiter = request.app.state.rate_limiter
    redis = getattr(limiter, "redis", None)
    return throttle.make(_settings(request), pools.directory_db or pools.db(pools.home), redis)


async def _throttled(request: Request, subjects: list[throttle.Subject]) -> None:
    """429 with Retry-After while any subject waits, before any password is hashed."""
    wait = await _login_throttle(request).wait(subjects)
    if wait > 0:
        raise throttle.refusal(wait)


async def _failed(request: Request, subjects: list[throttle.Subject], user_id: int | None = None) -> None:
    """Count a failed attempt against each subject; the failure that engages a backoff is recorded
    in the security log (of the first cell: the subjects are HMACs, the address is the request's)."""
    limiter = _login_throttle(request)
    pools: CellPools = request.app.state.cells
    for subject in subjects:
        failure = await limiter.fail(subject)
        if failure.engaged or failure.failures == _settings(request).login_throttle_max_per_hour:
            async with pools.db(pools.home).anonymous() as tx:
                await sessions.security_event(
                    tx,
                    "auth.throttle_engaged",
                    user_id=user_id if subject.kind == "account" else None,
                    ip=client_ip(request),
                    request_id=request.state.request_id,
                    details={"subject": subject.kind, "failures": failure.failures, "wait_seconds": failure.wait},
                )


def _user_agent(request: Request) -> str | None:
    return request.headers.get("user-agent")


def _token_out(issued: sessions.Issued, tenant: Membership | None, tenants: list[Membership]) -> TokenOut:
    return TokenOut(
        access_token=issued.access_token,
        expires_in=issued.expires_in,
        refresh_token=issued.refresh_token,
        tenant=tenant,
        tenants=tenants,
    )


@router.post(
    "/auth/register",
    status_code=202,
    response_model=RegisterOut,
    tags=["auth"],
    operation_id="register",
    summary="Create an account: an email confirms the address (the same answer whether or not the email "
    "has an account)",
    responses={
        422: {
            "description": "Invalid body, naming the field: a password refused by the password policy, an email "
            "on a reserved domain (.test, .invalid ...) or mixing scripts (a Cyrillic letter among Latin ones) "
            "(application/problem+json)"
        },
        429: {
            "description": "Too many registrations for this email: wait Retry-After seconds (application/problem+json)"
        },
    },
)
async def register(body: RegisterIn, request: Request) -> Any:
    """202 and the same body for every valid request. A new email gets an unverified account and a
    link to confirm the address (valid 24 hours, once; POST its token to /auth/verify-email); an
    email that has an account gets a message saying so (how to sign in, or reset the password),
    and its account is not changed. Sign in with the new account at once; it creates a tenant once
    its address is confirmed. The email's language follows Accept-Language (French by default).
    Every request counts against the email (separate counters from sign-in): 429 with Retry-After."""
    settings = _settings(request)
    ip, request_id = client_ip(request), request.state.request_id
    # Per email only: several people behind one address (a school's network) register in a row.
    subjects = throttle.subjects(settings, body.email, None, scope="register")
    await _throttled(request, subjects)
    await _failed(request, subjects)
    # No transaction from a dependency: the password is hashed before one begins.
    await service.register(
        request.app.state.cells,
        settings,
        request.app.state.load.hashing,
        body,
        accept_language=request.headers.get("accept-language"),
        ip=ip,
        request_id=request_id,
    )
    return JSONResponse({"detail": verification.ANSWER}, status_code=202)


@router.post(
    "/auth/verify-email",
    status_code=204,
    response_class=Response,
    tags=["auth"],
    operation_id="verify_email",
    summary="Confirm your email address with the token of the verification email's link",
    responses={
        404: {"description": "No such token, or a newer link replaced it (application/problem+json)"},
        410: {"description": "The link was used already, or has expired (application/problem+json)"},
        429: {"description": "Too many unknown tokens from this address: wait Retry-After seconds"},
    },
)
async def verify_email(body: VerifyEmailIn, request: Request) -> Response:
    """The token's account is verified (once). No session is given: the link proves the address,
    not the password (sign in as usual). Unknown tokens count against the client address like
    failed sign-ins."""
    settings = _settings(request)
    pools: CellPools = request.app.state.cells
    ip, request_id = client_ip(request), request.state.request_id
    by_address = [s for s in throttle.subjects(settings, "", ip) if s.kind == "ip"]
    await _throttled(request, by_address)
    cell = verification.token_cell(body.token)
    row = None
    if cell is not None and cell in pools.dbs:
        async with pools.db(cell).anonymous(client_ip=ip, request_id=request_id) as tx:
            row = await tx.fetchrow(
                "SELECT * FROM app.confirm_email_verification(%s)", (verification.digest(settings, body.token),)
            )
            assert row is not None
            if row["outcome"] == "ok":
                await sessions.security_event(
                    tx, "auth.email_verified", user_id=row["user_id"], ip=ip, request_id=request_id
                )
    if row is None or row["outcome"] == "unknown":
        await _failed(request, by_address)
        raise verification.refused("unknown")
    if row["outcome"] != "ok":
        raise verification.refused(row["outcome"])
    request.state.user_id = row["user_id"]
    return Response(status_code=204)


@router.post(
    "/auth/verify-email/resend",
    status_code=202,
    response_model=VerifyEmailResendOut,
    tags=["auth"],
    operation_id="resend_verification_email",
    summary="Send the link to confirm my email address again (the older links stop working)",
    responses={
        409: {"description": "Your address is verified already (application/problem+json)"},
        429: {"description": "Too many requests: wait Retry-After seconds (application/problem+json)"},
    },
)
async def resend_verification_email(request: Request, who: UserPrincipal) -> Any:
    if who.user_id is None:
        raise Problem(403, "Forbidden", "this endpoint needs a user token, not an API key")
    settings = _settings(request)
    pools: CellPools = request.app.state.cells
    ip, request_id = client_ip(request), request.state.request_id
    await check_session(request, who)
    accounts = accounts_of(request, who)
    subjects = throttle.subjects(settings, f"user {sorted(accounts.items())}", None, scope="verify-resend")
    await _throttled(request, subjects)
    sent = 0
    for cell, user_id in accounts.items():
        token = verification.new_token(cell)
        mail = verification.verify_message(settings, token, request.headers.get("accept-language"))
        async with pools.db(cell).anonymous(user_id=user_id, client_ip=ip, request_id=request_id) as tx:
            outcome = await tx.fetchval(
                "SELECT app.resend_email_verification(%s, %s, %s, %s, %s, %s, %s)",
                (
                    verification.digest(settings, token),
                    verification.VERIFY_HOURS,
                    ip,
                    *verification.parts(mail),
                ),
            )
            if outcome == "sent":
                sent += 1
                await sessions.security_event(
                    tx,
                    "auth.verification_resent",
                    user_id=user_id,
                    session_id=who.session_id,
                    ip=ip,
                    request_id=request_id,
                )
    if not sent:
        raise Problem(409, "Conflict", "your email address is verified already", type_="already-verified")
    await _failed(request, subjects)
    return JSONResponse({"detail": "a new link to confirm your address was sent (valid 24 hours)"}, status_code=202)


@router.post(
    "/auth/login",
    response_model=TokenOut,
    tags=["auth"],
    operation_id="login",
    summary="Sign in: an access token (15 minutes), a refresh token, and the list of your tenants "
    "(selected if there is only one)",
    responses={
        429: {
            "description": "Too many failed sign-ins for this account or from this address: wait Retry-After "
            "seconds (application/problem+json)"
        }
    },
)
async def login(body: LoginIn, request: Request) -> Any:
    settings = _settings(request)
    pools = request.app.state.cells
    ip = client_ip(request)
    # A full hashing queue: refuse before reading anything (the throttle's store included).
    request.app.state.load.hashing.gate.check_room(ANONYMOUS)
    subjects = throttle.subjects(settings, body.email, ip)
    await _throttled(request, subjects)
    try:
        signed_in = await service.sign_in(
            pools, settings, request.app.state.load.hashing, body, ip=ip, request_id=request.state.request_id
        )
    except Problem as problem:
        if problem.status == 401:
            await _failed(request, subjects)
        raise
    await _login_throttle(request).clear(subjects[0])
    issued = await sessions.start(
        pools,
        settings,
        signed_in.accounts,
        signed_in.selected,
        signed_in.platform_admin,
        ip=ip,
        user_agent=_user_agent(request),
    )
    request.state.user_id = next(iter(signed_in.accounts.values()))
    return _token_out(issued, signed_in.selected, signed_in.tenants)


@router.post(
    "/auth/refresh",
    response_model=TokenOut,
    tags=["auth"],
    operation_id="refresh_session",
    summary="A new access token and refresh token for a refresh token (each is good for one use)",
    responses={
        401: {
            "description": "Unknown, spent, revoked or expired refresh token. A refresh token used a second time "
            "ends its whole session (application/problem+json)"
        }
    },
)
async def refresh(body: RefreshIn, request: Request) -> Any:
    settings = _settings(request)
    pools: CellPools = request.app.state.cells
    refreshed = await sessions.refresh(
        pools,
        settings,
        body.refresh_token,
        ip=client_ip(request),
        user_agent=_user_agent(request),
        request_id=request.state.request_id,
    )
    cell = refreshed.issued.cell
    tenants = await service.all_memberships(pools, refreshed.accounts)
    # The tenant the session acts for, if the person is still a member and it is still open.
    selected = next(
        (
            t
            for t in tenants
            if t.id == refreshed.selected_tenant and t.status in service.SELECTABLE and (t.cell or cell) == cell
        ),
        None,
    )
    request.state.user_id = refreshed.accounts[cell]
    return _token_out(sessions.reissue(settings, refreshed, selected), selected, tenants)


@router.post(
    "/auth/logout",
    status_code=204,
    response_class=Response,
    tags=["auth"],
    operation_id="logout",
    summary="End this session: its refresh token and access tokens stop working",
)
async def logout(request: Request, who: UserPrincipal) -> Response:
    if who.user_id is None:
        raise Problem(403, "Forbidden", "this endpoint needs a user token, not an API key")
    if who.session_id is not None:
        await sessions.end(request.app.state.cells, principal_cell(request, who), who.user_id, who.session_id, "logout")
    return Response(status_code=204)


@router.post(
    "/auth/logout-all",
    status_code=204,
    response_class=Response,
    tags=["auth"],
    operation_id="logout_all",
    summary="End every session of yours, this one included, on every device",
)
async def logout_all(request: Request, who: UserPrincipal) -> Response:
    if who.user_id is None:
        raise Problem(403, "Forbidden", "this endpoint needs a user token, not an API key")
    await check_session(request, who)
    await sessions.end_all(
        request.app.state.cells,
        accounts_of(request, who),
        keep=None,
        reason="logout-all",
        ip=client_ip(request),
        request_id=request.state.request_id,
        event="auth.logout_all",
    )
    return Response(status_code=204)


@router.post(
    "/auth/select-tenant",
    response_model=TokenOut,
    tags=["auth"],
    operation_id="select_tenant",
    summary="A new token acting for one of your tenants",
)
async def select_tenant(body: SelectTenantIn, request: Request, who: UserPrincipal) -> Any:
    if who.user_id is None:
        raise Problem(403, "Forbidden", "this endpoint needs a user token, not an API key")
    pools = request.app.state.cells
    settings = _settings(request)
    await check_session(request, who)
    accounts = accounts_of(request, who)
    tenants = await service.all_memberships(pools, accounts)
    chosen = service.choose(tenants, body.tenant)
    home = principal_cell(request, who)
    cell = chosen.cell or home
    issued = None
    if who.session_id is not None and cell == home:
        # The same session, now acting for the chosen tenant (its refresh token replaced).
        issued = await sessions.reselect(pools, settings, cell, who.session_id, accounts, chosen, who.platform_admin)
        if issued is None:
            raise sessions.refused("this session has ended: sign in again")
    else:
        # A session of its own in the chosen tenant's cell. The caller's stays: its token may still
        # select a tenant of its own cell (it ends with logout-all, like any other).
        issued = await sessions.start(
            pools,
            settings,
            accounts,
            chosen,
            who.platform_admin,
            ip=client_ip(request),
            user_agent=_user_agent(request),
        )
    async with pools.db(cell).anonymous(user_id=accounts[cell], client_ip=client_ip(request)) as tx:
        await audit.record(
            tx,
            chosen.id,
            "auth.tenant_selected",
            user_id=accounts[cell],
            details={"role": chosen.role},
            ip=client_ip(request),
            request_id=request.state.request_id,
        )
    return _token_out(issued, chosen, tenants)


@router.post(
    "/auth/accept-invitation",
    response_model=TokenOut,
    tags=["auth"],
    operation_id="accept_invitation",
    # The bearer token is optional (a new person has none): OpenAPI's empty requirement says so.
    openapi_extra={"security": [{}]},
    summary="Accept an invitation: join its tenant, as your account (signed in) or as a new one (name, password)",
    responses={
        403: {
            "description": "The invitation is for another email, or the tenant is not open (application/problem+json)"
        },
        404: {"description": "No such invitation (application/problem+json)"},
        409: {"description": "Used already, or the email has an account: sign in first (application/problem+json)"},
        410: {"description": "Revoked or expired (application/problem+json)"},
        422: {"description": "Invalid body; also a new password refused by the password policy, naming the field"},
        429: {"description": "Too many unknown tokens from this address: wait Retry-After seconds"},
    },
)
async def accept_invitation(body: AcceptInvitationIn, request: Request, bearer: BearerCredential) -> Any:
    """The token names the tenant (and its cell): no tenant credential is needed. With `password`, a
    new account of the invited email is created in the tenant's cell; without, the bearer token of
    an existing account of that email joins. Unknown tokens count against the client address like
    failed sign-ins (429 with Retry-After once it waits)."""
    settings = _settings(request)
    pools: CellPools = request.app.state.cells
    ip, request_id = client_ip(request), request.state.request_id
    who: Principal | None = None
    if body.password is None:
        if bearer is None:
            raise Problem(
                401,
                "Unauthorized",
                "sign in and send your token (Authorization: Bearer), or choose a name and a password",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if api_keys.looks_like_key(bearer.credentials):
            raise Problem(403, "Forbidden", "this endpoint needs a user token, not an API key")
        who = principal_from_token(settings, bearer.credentials)
        await check_session(request, who)
    by_address = [s for s in throttle.subjects(settings, "", ip) if s.kind == "ip"]
    await _throttled(request, by_address)
    cell = invitations.token_cell(body.token)
    found = None
    if cell is not None and cell in pools.dbs:
        async with pools.db(cell).anonymous(read_only=True) as tx:
            found = await invitations.find(tx, settings, body.token)
    if cell is None or found is None:
        await _failed(request, by_address)
        raise invitations.refused("unknown")
    user_id = None
    if who is not None:
        user_id = who.account_in(cell) if who.cell is not None or cell == principal_cell(request, who) else None
        if user_id is None:
            raise Problem(
                403,
                "Forbidden",
                "your account is not in the region of this tenant: accept with a name and a password instead",
                type_="invitation-other-cell",
            )
    hashed = None
    if body.password is not None:
        if (weak := policy.problem(body.password, found["email"])) is not None:
            raise invalid("body.password", weak)
        request.app.state.load.hashing.gate.check_room(ANONYMOUS)
        hashed = await passwords.hash_password(settings, body.password, request.app.state.load.hashing)
    if hashed is not None and pools.directory_db is not None:
        # Directory first (as for registration): sign-in must find the new account's cell.
        async with pools.directory_db.anonymous() as dtx:
            await directory.record_login(dtx, settings, found["email"], cell)
    async with pools.db(cell).anonymous(user_id=user_id, client_ip=ip, request_id=request_id) as tx:
        row = await invitations.accept(
            tx, settings, found, body.token, user_id, body.name, hashed, ip=ip, request_id=request_id
        )
    accounts = accounts_of(request, who) if who is not None else {cell: row["user_id"]}
    label = None if pools.single else cell
    joined = Membership(
        id=row["tenant_id"], slug=row["slug"], name=row["name"], role=row["role"], status=row["status"], cell=label
    )
    issued = await sessions.start(
        pools, settings, accounts, joined, who.platform_admin if who else False, ip=ip, user_agent=_user_agent(request)
    )
    request.state.user_id = row["user_id"]
    return _token_out(issued, joined, await service.all_memberships(pools, accounts))


@router.post(
    "/auth/password-reset",
    status_code=202,
    response_model=PasswordResetOut,
    tags=["auth"],
    operation_id="request_password_reset",
    summary="Ask for a password-reset link by email (the same answer whether or not the email has an account)",
    responses={
        429: {
            "description": "Too many reset requests for this email or from this address: wait Retry-After "
            "seconds (application/problem+json)"
        }
    },
)
async def request_password_reset(body: PasswordResetIn, request: Request) -> Any:
    """202 and the same body for every well-formed email: if it has an account, a link valid 30
    minutes (and once) is emailed; a newer request replaces it. Every request counts against the
    email and the client address, as failed sign-ins do (separate counters): 429 with Retry-After."""
    settings = _settings(request)
    pools: CellPools = request.app.state.cells
    ip, request_id = client_ip(request), request.state.request_id
    subjects = throttle.subjects(settings, body.email, ip, scope="reset")
    await _throttled(request, subjects)
    await _failed(request, subjects)
    # One link per account: a person with accounts in two cells gets one for each (each cell
    # resets only its own account; no cell may set the password of an account it was not asked by).
    for cell in await pools.login_cells(settings, body.email) or [pools.home]:
        token = resets.new_token(cell)
        lang, subject, text, html = resets.message(settings, token, request.headers.get("accept-language"))
        async with pools.db(cell).anonymous(client_ip=ip, request_id=request_id) as tx:
            user_id = await tx.fetchval(
                "SELECT app.request_password_reset(%s, %s, %s, %s, %s, %s, %s, %s)",
                (body.email, resets.digest(settings, token), resets.RESET_MINUTES, ip, lang, subject, text, html),
            )
            await sessions.security_event(
                tx,
                "auth.password_reset_requested",
                user_id=user_id,
                ip=ip,
                request_id=request_id,
                details={"account": user_id is not None},
            )
    return JSONResponse({"detail": resets.ANSWER}, status_code=202)


@router.post(
    "/auth/password-reset/confirm",
    status_code=204,
    response_class=Response,
    tags=["auth"],
    operation_id="confirm_password_reset",
    summary="Choose a new password with a reset link's token; every session of the account ends",
    responses={
        404: {"description": "No such reset token, or a newer request replaced it (application/problem+json)"},
        410: {"description": "The token was used already, or has expired (application/problem+json)"},
        422: {"description": "Invalid body; also a new password refused by the password policy, naming the field"},
        429: {"description": "Too many unknown tokens from this address: wait Retry-After seconds"},
    },
)
async def confirm_password_reset(body: PasswordResetConfirmIn, request: Request) -> Response:
    """The token sets the password of its account (in the token's cell; a person with accounts in
    several cells got one link per account) and ends all its sessions: refresh tokens and access tokens stop working on their next
    request. Unknown tokens count against the client address like failed sign-ins."""
    settings = _settings(request)
    pools: CellPools = request.app.state.cells
    ip, request_id = client_ip(request), request.state.request_id
    by_address = [s for s in throttle.subjects(settings, "", ip) if s.kind == "ip"]
    await _throttled(request, by_address)
    cell = resets.token_cell(body.token)
    hashed_token = resets.digest(settings, body.token)
    found = None
    if cell is not None and cell in pools.dbs:
        async with pools.db(cell).anonymous(read_only=True) as tx:
            found = await tx.fetchrow("SELECT * FROM app.find_password_reset(%s)", (hashed_token,))
    if cell is None or found is None or found["outcome"] == "unknown":
        await _failed(request, by_address)
        raise resets.refused("unknown")
    if found["outcome"] != "ok":
        raise resets.refused(found["outcome"])
    email = found["email"]
    if (weak := policy.problem(body.new_password, email)) is not None:
        raise invalid("body.new_password", weak)
    cpu = request.app.state.load.hashing
    cpu.gate.check_room(ANONYMOUS)
    hashed = await passwords.hash_password(settings, body.new_password, cpu)
    async with pools.db(cell).anonymous(client_ip=ip, request_id=request_id) as tx:
        row = await tx.fetchrow("SELECT * FROM app.confirm_password_reset(%s, %s)", (hashed_token, hashed))
        assert row is not None
        if row["outcome"] != "ok":
            raise resets.refused(row["outcome"])
        await sessions.security_event(
            tx,
            "auth.password_reset",
            user_id=row["user_id"],
            ip=ip,
            request_id=request_id,
            details={"sessions_ended": row["ended"]},
        )
    # The person can sign in at once, whatever an attacker did to their account's counter.
    await _login_throttle(request).clear(throttle.subjects(settings, email, ip)[0])
    request.state.user_id = row["user_id"]
    return Response(status_code=204)


@router.get(
    "/me", response_model=MeOut, tags=["auth"], operation_id="get_me", summary="Who am I: user, current tenant and role"
)
async def me(who: CurrentPrincipal, request: Request) -> Any:
    return await _whoami(request, who)


async def _whoami(request: Request, who: Principal) -> MeOut:
    if who.tenant_id is not None:
        await tenant_context(request, who)  # the directory must agree with the credential's cell
    return await service.whoami(request.app.state.cells, principal_cell(request, who), accounts_of(request, who), who)


@router.get(
    "/me/tenants",
    response_model=list[MyTenant],
    tags=["auth"],
    operation_id="list_my_tenants",
    summary="My tenants, with my role in each; `current` marks the one this credential acts for",
)
async def my_tenants(who: CurrentPrincipal, request: Request) -> Any:
    return (await _whoami(request, who)).tenants


@router.get(
    "/me/sessions",
    response_model=list[SessionOut],
    tags=["auth"],
    operation_id="list_my_sessions",
    summary="My active sessions (signed-in devices), most recently used first; `current` marks this one",
)
async def my_sessions(request: Request, who: UserPrincipal) -> Any:
    if who.user_id is None:
        raise Problem(403, "Forbidden", "this endpoint needs a user token, not an API key")
    await check_session(request, who)
    return await sessions.listing(request.app.state.cells, accounts_of(request, who), who.session_id)


@router.delete(
    "/me/sessions/{session_id}",
    status_code=204,
    response_class=Response,
    tags=["auth"],
    operation_id="revoke_my_session",
    summary="End one of my sessions (sign a device out)",
)
async def revoke_my_session(session_id: UUID, request: Request, who: UserPrincipal) -> Response:
    if who.user_id is None:
        raise Problem(403, "Forbidden", "this endpoint needs a user token, not an API key")
    await check_session(request, who)
    pools: CellPools = request.app.state.cells
    for cell, user_id in accounts_of(request, who).items():
        if await sessions.end(pools, cell, user_id, session_id, "revoked by its owner"):
            async with pools.db(cell).anonymous(user_id=user_id) as tx:
                await sessions.security_event(
                    tx,
                    "auth.session_revoked",
                    user_id=user_id,
                    session_id=session_id,
                    ip=client_ip(request),
                    request_id=request.state.request_id,
                )
            return Response(status_code=204)
    raise not_found("session", session_id)


@router.post(
    "/me/password",
    status_code=204,
    response_class=Response,
    tags=["auth"],
    operation_id="change_my_password",
    summary="Change my password (needs the current one); my other sessions end",
    responses={
        403: {"description": "The current password is wrong (application/problem+json)"},
        422: {"description": "The new password is refused by the password policy, naming the field"},
        429: {"description": "Too many wrong current passwords: wait Retry-After seconds"},
    },
)
async def change_password(body: PasswordChangeIn, request: Request, who: UserPrincipal) -> Response:
    if who.user_id is None:
        raise Problem(403, "Forbidden", "this endpoint needs a user token, not an API key")
    settings = _settings(request)
    pools: CellPools = request.app.state.cells
    home = principal_cell(request, who)
    accounts = accounts_of(request, who)
    # The login of each account (the session checked in the token's cell, same round trip).
    logins: dict[str, dict[str, Any]] = {}
    for cell, user_id in accounts.items():
        async with pools.db(cell).anonymous(
            user_id=user_id, read_only=True, gate=session_gate(who) if cell == home else None
        ) as tx:
            row = await tx.fetchrow("SELECT * FROM app.my_login()")
        if row is not None and row["password_hash"]:
            logins[cell] = row
    if home not in logins:
        raise Problem(403, "Forbidden", "this account has no password to change")
    new_password_policy = service.check_new_password(body.new_password, logins[home]["email"])
    subjects = throttle.subjects(settings, logins[home]["email"], client_ip(request))
    await _throttled(request, subjects)
    cpu = request.app.state.load.hashing
    # The password of every account of the person that has the same one (a person with accounts in
    # two cells signs in to both with one password).
    matching = [
        cell
        for cell, row in logins.items()
        if await passwords.verify_password(settings, row["password_hash"], body.current_password, cpu)
    ]
    if home not in matching:
        await _failed(request, subjects, who.user_id)
        async with pools.db(home).anonymous(user_id=who.user_id) as tx:
            await sessions.security_event(
                tx,
                "auth.password_change_failed",
                user_id=who.user_id,
                session_id=who.session_id,
                ip=client_ip(request),
                request_id=request.state.request_id,
                details={"reason": "wrong current password"},
            )
        raise Problem(403, "Forbidden", "the current password is wrong", type_="wrong-password")
    hashed = await passwords.hash_password(settings, new_password_policy, cpu)
    for cell in matching:
        async with pools.db(cell).anonymous(
            user_id=accounts[cell], client_ip=client_ip(request), request_id=request.state.request_id
        ) as tx:
            if not await tx.fetchval("SELECT app.change_my_password(%s, %s)", (logins[cell]["password_hash"], hashed)):
                raise Problem(409, "Conflict", "the password was changed meanwhile: try again", type_="conflict")
            ended = await tx.fetchval(
                "SELECT app.revoke_my_sessions(%s, %s)",
                (who.session_id if cell == home else None, "password changed"),
            )
            await sessions.security_event(
                tx,
                "auth.password_changed",
                user_id=accounts[cell],
                session_id=who.session_id if cell == home else None,
                ip=client_ip(request),
                request_id=request.state.request_id,
                details={"other_sessions_ended": ended},
            )
    return Response(status_code=204)


@router.post(
    "/api-keys",
    status_code=201,
    response_model=ApiKeyCreated,
    tags=["api-keys"],
    operation_id="create_api_key",
    summary="Create an API key (the secret is returned once)",
    responses={422: {"description": "Invalid body, or expires_at not in the future (application/problem+json)"}},
)
async def create_api_key(body: ApiKeyCreate, request: Request, s: Admin, idempotency: Idempotent) -> Any:
    # The secret is not stored with the answer: a replay shows the key without it.
    return await idempotency.create(
        s,
        lambda last: service.create_key(s.tx, _settings(request), s.ctx.tenant_id, s.ctx.user_id, body, s.cell),
        redact=("key",),
    )


@router.get(
    "/api-keys",
    response_model=list[ApiKeyOut],
    tags=["api-keys"],
    operation_id="list_api_keys",
    summary="List API keys (no secrets)",
)
async def list_api_keys(s: Viewer) -> Any:
    return await service.list_keys(s.tx, s.ctx.tenant_id)


@router.delete(
    "/api-keys/{key_id}",
    status_code=204,
    response_class=Response,
    tags=["api-keys"],
    operation_id="revoke_api_key",
    summary="Revoke an API key",
)
async def revoke_api_key(key_id: UUID, request: Request, s: Admin) -> Response:
    if not await service.revoke_key(s.tx, s.ctx.tenant_id, key_id):
        raise not_found("API key", key_id)
    request.app.state.key_cache.clear()
    return Response(status_code=204)
