"""One account per address: emails are normalised (NFKC, case folded, IDNA) wherever they enter,
and look-alikes that mix scripts are refused naming the field.

The defect: `ａｄｍｉｎ@…` (fullwidth) and `аdmin@…` (Cyrillic а) became new accounts next to
`admin@…`, so an admin adding "admin@…" as a member could be handed someone else's account.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from api_support import PASSWORD, ApiWorld
from conftest import run_cli
from iafactory.emails import normalize_email

API = "/api/v1"
FULLWIDTH = str.maketrans({c: chr(ord(c) + 0xFEE0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"})
CYRILLIC_A, GREEK_O = "\u0430", "\u03bf"


@pytest.mark.parametrize(
    ("given_", "stored"),
    [
        ("Jean.Dupont@Cabinet-Dupont.CH", "jean.dupont@cabinet-dupont.ch"),
        ("ａｄｍｉｎ@example.ch", "admin@example.ch"),  # fullwidth
        ("𝐚𝐝𝐦𝐢𝐧@example.ch", "admin@example.ch"),  # mathematical bold
        ("admin@ｅｘａｍｐｌｅ.ch", "admin@example.ch"),
        ("  admin@example.ch ", "admin@example.ch"),
        ("MÜLLER@EXÄMPLE.CH", "müller@exämple.ch"),
        ("müller@xn--exmple-cua.ch", "müller@exämple.ch"),  # the same domain in its ASCII (IDNA) spelling
        ("иван@пример.рф", "иван@пример.рф"),  # one script per part is fine
        ("ivan@пример.рф", "ivan@пример.рф"),  # Latin local part at a Cyrillic domain too
        ("山田たろう@example.jp", "山田たろう@example.jp"),  # Han + Hiragana: allowed together
    ],
)
def test_normalised_spelling(given_: str, stored: str) -> None:
    assert normalize_email(given_) == stored


@pytest.mark.parametrize(
    ("address", "said"),
    [
        (f"{CYRILLIC_A}dmin@example.ch", "local part mixes Cyrillic and Latin"),
        (f"adm{GREEK_O}n@example.ch", "local part mixes Greek and Latin"),
        (f"admin@ex{CYRILLIC_A}mple.ch", "domain label 'exаmple' mixes Cyrillic and Latin"),
        ("admin@раура.com", "written in Cyrillic letters that look like Latin ones"),  # all-Cyrillic "paypa"
        ("not-an-email", "not a valid email address"),
    ],
)
def test_look_alikes_and_garbage_are_refused(address: str, said: str) -> None:
    with pytest.raises(ValueError, match=said):
        normalize_email(address)


@given(
    st.from_regex(r"[A-Za-z0-9._%+-]{1,20}@[A-Za-z0-9]{1,10}\.(ch|fr|dz|be|ca)", fullmatch=True).filter(
        lambda e: ".." not in e and not e.startswith(".") and ".@" not in e
    )
)
def test_ascii_addresses_are_only_lowercased_and_it_is_stable(address: str) -> None:
    """What every stored row looks like so far (lowercase ASCII) keeps its meaning."""
    try:
        once = normalize_email(address)
    except ValueError:
        return  # e.g. a local part email-validator refuses; not what this checks
    assert once == address.lower()
    assert normalize_email(once) == once
    assert normalize_email(address.upper()) == once


# --- through the API --------------------------------------------------------------------------------


def problem_field(r: httpx.Response) -> str:
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json", r.text
    return r.json()["errors"][0]["field"]


async def register(client: httpx.AsyncClient, email: str) -> httpx.Response:
    return await client.post(f"{API}/auth/register", json={"email": email, "password": PASSWORD, "name": "x"})


@pytest.mark.anyio
async def test_look_alike_registrations_do_not_create_second_accounts(api_world: ApiWorld) -> None:
    c = api_world.client
    local = f"admin{uuid.uuid4().hex[:6]}"
    first = await register(c, f"{local}@example.ch")
    assert first.status_code == 202, first.text
    for variant in (local.upper(), local.translate(FULLWIDTH)):
        r = await register(c, f"{variant}@example.ch")
        # The same account, not a new one (the same answer as for a new address: nothing tells).
        assert (r.status_code, r.content) == (202, first.content), (variant, r.text)
    for spoof in (f"{CYRILLIC_A}{local[1:]}", local.replace("a", CYRILLIC_A, 1)):
        assert problem_field(await register(c, f"{spoof}@example.ch")) == "body.email"
    with psycopg.connect(api_world.admin_url) as conn:
        n = conn.execute(
            "SELECT count(*) FROM users WHERE email ILIKE %s OR email LIKE %s",
            (f"%{local[1:]}@example.ch", f"%{local.translate(FULLWIDTH)[1:]}%"),
        ).fetchone()[0]
    assert n == 1


@pytest.mark.anyio
async def test_sign_in_with_any_spelling_of_the_address(api_world: ApiWorld) -> None:
    c = api_world.client
    local = f"jean{uuid.uuid4().hex[:6]}"
    assert (await register(c, f"{local}@example.ch")).status_code == 202
    for spelling in (f"{local.upper()}@EXAMPLE.CH", f"{local.translate(FULLWIDTH)}@example.ch"):
        r = await c.post(f"{API}/auth/login", json={"email": spelling, "password": PASSWORD})
        assert r.status_code == 200, (spelling, r.text)
    r = await c.post(f"{API}/auth/login", json={"email": f"{CYRILLIC_A}{local}@example.ch", "password": PASSWORD})
    assert problem_field(r) == "body.email"


@pytest.mark.anyio
async def test_adding_a_member_finds_the_account_behind_any_spelling(api_world: ApiWorld) -> None:
    c, w = api_world.client, api_world
    local = f"new{uuid.uuid4().hex[:6]}"
    assert (await register(c, f"{local}@example.ch")).status_code == 202
    r = await c.post(
        f"{API}/members",
        json={"email": f"{local.translate(FULLWIDTH)}@Example.CH", "role": "viewer"},
        headers=w.a.auth("admin"),
    )
    assert r.status_code == 201 and r.json()["email"] == f"{local}@example.ch", r.text
    r = await c.post(
        f"{API}/members", json={"email": f"{local}@ex{CYRILLIC_A}mple.ch", "role": "viewer"}, headers=w.a.auth("admin")
    )
    assert problem_field(r) == "body.email"


@pytest.mark.anyio
async def test_tenant_admin_email_is_normalised_and_checked(api_world: ApiWorld) -> None:
    c, w = api_world.client, api_world
    r = await c.patch(f"{API}/tenant", json={"admin_email": "ＣＯＮＴＡＣＴ@Example.ch"}, headers=w.a.auth("owner"))
    assert r.status_code == 200 and r.json()["admin_email"] == "contact@example.ch", r.text
    r = await c.patch(f"{API}/tenant", json={"admin_email": f"c{GREEK_O}ntact@example.ch"}, headers=w.a.auth("owner"))
    assert problem_field(r) == "body.admin_email"


# --- through the CLI --------------------------------------------------------------------------------


def one_error_line(result: Any) -> str:
    lines = result.stderr.splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_cli_normalises_and_refuses_look_alikes(migrated_db: str) -> None:
    slug = f"emails-{uuid.uuid4().hex[:6]}"
    r = run_cli(
        "tenants",
        "create",
        "--name",
        "Emails",
        "--slug",
        slug,
        "--region",
        "CH",
        "--admin-email",
        f"{CYRILLIC_A}dmin@example.ch",
        db_url=migrated_db,
    )
    assert "--admin-email" in one_error_line(r) and "mixes Cyrillic and Latin" in r.stderr
    r = run_cli(
        "tenants",
        "create",
        "--name",
        "Emails",
        "--slug",
        slug,
        "--region",
        "CH",
        "--admin-email",
        "ＡＤＭＩＮ@example.ch",
        db_url=migrated_db,
    )
    assert r.returncode == 0, r.stderr
    r = run_cli(
        "tenants",
        "add-user",
        slug,
        "Owner@Example.ch",
        "--role",
        "owner",
        "--password-stdin",
        db_url=migrated_db,
        input="a long enough password\n",
    )
    assert r.returncode == 0 and "created and added owner@example.ch" in r.stdout, (r.stdout, r.stderr)
    r = run_cli("tenants", "add-user", slug, "ｏｗｎｅｒ@example.ch", "--role", "admin", db_url=migrated_db)
    assert r.returncode == 0 and "created" not in r.stdout, r.stdout  # the same user, re-roled
    r = run_cli("tenants", "add-user", slug, f"{CYRILLIC_A}dmin@example.ch", db_url=migrated_db)
    assert one_error_line(r).startswith("error: EMAIL: the local part mixes Cyrillic and Latin")
    with psycopg.connect(migrated_db) as conn:
        assert (
            conn.execute("SELECT admin_email FROM tenants WHERE slug = %s", (slug,)).fetchone()[0] == "admin@example.ch"
        )
        assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 1
