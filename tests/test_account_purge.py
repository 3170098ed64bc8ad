"""The purge of spent account records (migration 029, auth/purge.py), as the worker's periodic
maintenance runs it: sessions ended more than 30 days ago (with their refresh tokens), refresh
tokens rotated that long ago, used or expired reset, verification and invitation tokens past 30
days, security events older than 180 days. Recent rows stay. Ages are made by moving timestamps in
SQL, never by waiting. The application role runs it (a definer function), and its retention floors
keep it from wiping a recent trail.
"""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest

from api_support import PASSWORD
from conftest import settings_for
from iafactory.auth.purge import Retention, purge_account_records
from iafactory.db import bootstrap
from iafactory.knowledge import worker
from test_sessions import API, bearer, client_at, new_ip, sid_of, sign_in

pytestmark = pytest.mark.anyio

SYSTEM_TENANT = uuid.UUID(int=0)  # migration 006's tenant, present in every test database


@pytest.fixture(scope="module")
def db_url(module_db: str) -> str:
    return module_db


def sql(url: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        cur = conn.execute(query, args)
        return cur.fetchall() if cur.description else []


def count(url: str, query: str, *args: Any) -> int:
    return int(sql(url, query, *args)[0][0])


async def test_old_records_go_and_recent_ones_stay(db_url: str) -> None:
    async with client_at(db_url, new_ip()) as c:
        email = f"purge-{uuid.uuid4().hex[:10]}@example.ch"
        assert (await c.post(f"{API}/auth/register", json={"email": email, "password": PASSWORD})).status_code == 202
        old_end, recent_end, expired, live = [await sign_in(c, email) for _ in range(4)]
        for session in (old_end, recent_end):
            assert (await c.post(f"{API}/auth/logout", headers=bearer(session["access_token"]))).status_code == 204
        r = await c.post(f"{API}/auth/refresh", json={"refresh_token": live["refresh_token"]})
        assert r.status_code == 200, r.text  # live's first refresh token is rotated now
        for _ in range(2):
            assert (await c.post(f"{API}/auth/password-reset", json={"email": email})).status_code == 202
    user_id = count(db_url, "SELECT id FROM users WHERE email = %s", email)
    sessions = {"old_end": old_end, "recent_end": recent_end, "expired": expired, "live": live}
    sids = {name: sid_of(session["access_token"]) for name, session in sessions.items()}

    # Ages: ended 31 days ago (goes) or 1 day ago (stays); expired 31 days ago without a logout (goes).
    sql(db_url, "UPDATE user_sessions SET revoked_at = now() - interval '31 days' WHERE id = %s", sids["old_end"])
    sql(db_url, "UPDATE user_sessions SET revoked_at = now() - interval '1 day' WHERE id = %s", sids["recent_end"])
    sql(db_url, "UPDATE user_sessions SET expires_at = now() - interval '31 days' WHERE id = %s", sids["expired"])
    sql(
        db_url,
        "UPDATE refresh_tokens SET rotated_at = now() - interval '31 days' WHERE session_id = %s "
        "AND rotated_at IS NOT NULL",
        sids["live"],
    )
    # The first reset link was replaced (used) by the second: 31 days ago. The verification link
    # expired 31 days ago. The second reset link is pending.
    sql(
        db_url,
        "UPDATE password_resets SET used_at = now() - interval '31 days' WHERE user_id = %s AND used_at IS NOT NULL",
        user_id,
    )
    sql(db_url, "UPDATE email_verifications SET expires_at = now() - interval '31 days' WHERE user_id = %s", user_id)
    fresh = f"fresh-{uuid.uuid4().hex[:8]}@example.ch"
    sql(
        db_url,
        "INSERT INTO email_verifications (token_hash, user_id, expires_at) VALUES (%s, %s, now() + interval '1 day')",
        uuid.uuid4().bytes,
        user_id,
    )
    # Invitations (a tenant table): accepted 31 days ago, revoked 31 days ago, expired 31 days ago
    # (all go); accepted 2 days ago and pending (stay).
    ages = {
        "accepted-old": "accepted_at = now() - interval '31 days'",
        "revoked-old": "revoked_at = now() - interval '31 days'",
        "expired-old": "expires_at = now() - interval '31 days'",
        "accepted-recent": "accepted_at = now() - interval '2 days'",
        "pending": "expires_at = now() + interval '7 days'",
    }
    for tag, age in ages.items():
        sql(
            db_url,
            "INSERT INTO invitations (tenant_id, email, role, token_hash, expires_at) "
            "VALUES (%s, %s, 'viewer', %s, now() + interval '7 days')",
            SYSTEM_TENANT,
            f"{tag}-{fresh}",
            uuid.uuid4().bytes,
        )
        sql(db_url, f"UPDATE invitations SET {age} WHERE email = %s", f"{tag}-{fresh}")
    # Security events: 181 days old (goes), 179 days old (stays).
    for days in (181, 179):
        sql(
            db_url,
            "INSERT INTO security_events (event, user_id, created_at, details) "
            "VALUES ('test.purge', %s, now() - make_interval(days => %s), %s)",
            user_id,
            days,
            f'{{"days": {days}}}',
        )

    async with bootstrap.database(settings_for(db_url), db_url) as db:
        # The worker's maintenance (the application role), with the default retentions; then, in
        # batches of 1, nothing is left to do.
        await worker.maintain(db, Retention())
        assert await purge_account_records(db, Retention(), batch=1) == {
            "sessions": 0,
            "refresh_tokens": 0,
            "password_resets": 0,
            "email_verifications": 0,
            "invitations": 0,
            "security_events": 0,
        }

    remaining = {r[0] for r in sql(db_url, "SELECT id::text FROM user_sessions WHERE user_id = %s", user_id)}
    assert remaining == {sids["recent_end"], sids["live"]}
    assert count(
        db_url, "SELECT count(*) FROM refresh_tokens WHERE session_id::text = ANY(%s)", list(sids.values())
    ) == (
        # recent_end's token, and live's current one (its rotated one went).
        2
    )
    assert count(db_url, "SELECT count(*) FROM refresh_tokens WHERE session_id = %s", sids["live"]) == 1
    assert count(db_url, "SELECT count(*) FROM password_resets WHERE user_id = %s", user_id) == 1  # the pending one
    assert count(db_url, "SELECT count(*) FROM password_resets WHERE user_id = %s AND used_at IS NULL", user_id) == 1
    assert count(db_url, "SELECT count(*) FROM email_verifications WHERE user_id = %s", user_id) == 1  # the fresh one
    kept = {
        r[0].split("-fresh-")[0] for r in sql(db_url, "SELECT email FROM invitations WHERE email LIKE %s", f"%{fresh}")
    }
    assert kept == {"accepted-recent", "pending"}
    kept_events = sql(db_url, "SELECT details->>'days' FROM security_events WHERE event = 'test.purge'")
    assert kept_events == [("179",)]


async def test_the_purge_is_limited_by_its_floors(db_url: str) -> None:
    """Retentions of 0 days are floored (30 days for security events, 1 day for tokens and
    sessions): the application role cannot wipe a recent trail with it."""
    tag = uuid.uuid4().hex
    for days in (31, 29):
        sql(
            db_url,
            "INSERT INTO security_events (event, created_at, details) VALUES ('test.floor', "
            "now() - make_interval(days => %s), %s)",
            days,
            f'{{"tag": "{tag}", "days": {days}}}',
        )
    for hours in (49, 12):
        sql(
            db_url,
            "INSERT INTO email_verifications (token_hash, user_id, expires_at) "
            "VALUES (%s, -1, now() - make_interval(hours => %s))",
            tag.encode() + str(hours).encode(),
            hours,
        )
    async with bootstrap.database(settings_for(db_url), db_url) as db:
        await purge_account_records(db, Retention(0, 0, 0))
    left = sql(db_url, "SELECT details->>'days' FROM security_events WHERE details->>'tag' = %s", tag)
    assert left == [("29",)]
    assert sql(db_url, "SELECT token_hash FROM email_verifications WHERE user_id = -1") == [(tag.encode() + b"12",)]
