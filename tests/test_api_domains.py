"""Every tenant record type over HTTP: a full round trip each, validation that names the field,
references across tenants refused with nothing written, and billing (account, credit ledger,
idempotent usage events)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest

from api_support import PASSWORD, ApiWorld, count_rows, login
from iafactory.auth.passwords import hash_password
from iafactory.db.scope import operator_transaction
from iafactory.domains import RESOURCES
from iafactory.tenancy import service as tenancy
from iafactory.tenancy.schemas import TenantCreate

pytestmark = pytest.mark.anyio

API = "/api/v1"
SPECS = {spec.name: spec for spec in RESOURCES}


def fields(r: httpx.Response) -> list[str]:
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    return [e["field"] for e in r.json()["errors"]]


def same(expected: Any, actual: Any) -> bool:
    """JSON equality, with timestamps compared as instants and numbers as numbers."""
    if isinstance(expected, str) and isinstance(actual, str) and "T" in expected and expected[:4].isdigit():
        try:
            return datetime.fromisoformat(expected) == datetime.fromisoformat(actual)
        except ValueError:
            pass
    if isinstance(expected, (int, float)) and isinstance(actual, (int, float)):
        return float(expected) == float(actual)
    return expected == actual


def assert_matches(sent: dict[str, Any], body: dict[str, Any]) -> None:
    mismatched = {k: (v, body.get(k)) for k, v in sent.items() if not same(v, body.get(k))}
    assert not mismatched, mismatched


# --- One case per resource -----------------------------------------------------------------------


async def new_project(c: httpx.AsyncClient, headers: dict[str, str], name: str = "Portail clients") -> int:
    r = await c.post(f"{API}/projects", json={"name": name}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


async def new_lead(c: httpx.AsyncClient, headers: dict[str, str], name: str = "Amina Benali") -> str:
    r = await c.post(f"{API}/crm/leads", json={"full_name": name}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


@dataclass
class Case:
    create: dict[str, Any]
    patch: dict[str, Any]
    bad_enum: tuple[str, Any]  # a field and a value its SQL CHECK refuses
    too_long: tuple[str, int]  # a text field and its length limit
    required: str  # a non-nullable field: an explicit null is refused
    parents: dict[str, str] = field(default_factory=dict)  # body field -> "project" | "lead"


CASES: dict[str, Case] = {
    "knowledge-base": Case(
        create={
            "title": "Procédure d'ouverture de compte",
            "content": "Étape 1 : vérifier la pièce d'identité. Étape 2 : contrôler l'adresse.",
            "source": "https://intranet.example.ch/kyc/ouverture",
            "language": "fr",
            "metadata": {"tags": ["kyc", "onboarding"], "version": 3},
        },
        patch={"language": "fr-CH", "source": None, "metadata": {"tags": ["kyc"], "version": 4}},
        bad_enum=("language", "français"),
        too_long=("title", 500),
        required="title",
    ),
    "bolt-workflows": Case(
        create={
            "name": "Générateur de devis",
            "prompt": "Crée une application de devis pour artisans genevois",
            "status": "queued",
            "definition": {"stack": "react", "pages": ["devis", "clients"]},
        },
        patch={"status": "completed", "result": {"url": "https://devis.example.ch", "files": 42}},
        bad_enum=("status", "done"),
        too_long=("name", 255),
        required="name",
        parents={"project_id": "project"},
    ),
    "bmad-workflows": Case(
        create={
            "name": "Refonte du portail RH",
            "phase": "planning",
            "status": "running",
            "agents": ["analyst", "pm", "architect"],
            "artifacts": {"prd": "PRD v1 — Personalverwaltung"},
        },
        patch={"phase": "solutioning", "project_id": None, "agents": ["architect", "dev"]},
        bad_enum=("phase", "design"),
        too_long=("name", 255),
        required="phase",
        parents={"project_id": "project"},
    ),
    "orchestrator-state": Case(
        create={
            "session_key": "sess-2026-04-17-ab12",
            "agent": "planificateur",
            "status": "running",
            "state": {"étape": "collecte", "contexte": {"client": "Müller AG"}},
            "last_step": 3,
        },
        patch={"status": "waiting", "last_step": 4},
        bad_enum=("status", "paused"),
        too_long=("agent", 100),
        required="last_step",
    ),
    "voice/transcriptions": Case(
        create={
            "title": "Appel client — Alger",
            "audio_url": "s3://voix/2026/04/appel-0142.wav",
            "language": "ar",
            "duration_seconds": 312.5,
            "transcript": "مرحبا، أريد معرفة حالة طلبي رقم ١٤٢",
            "status": "completed",
            "metadata": {"speakers": 2},
        },
        patch={"title": "Appel client — Alger (suivi)", "duration_seconds": 313.25, "audio_url": None},
        bad_enum=("status", "done"),
        too_long=("title", 255),
        required="status",
    ),
    "voice/conversations": Case(
        create={
            "agent_name": "Empfang Zürich",
            "channel": "phone",
            "caller": "+41 44 555 01 23",
            "language": "de",
            "messages": [
                {"role": "user", "text": "Grüezi, ich möchte einen Termin vereinbaren."},
                {"role": "agent", "text": "Gerne. Passt Ihnen Dienstag um 10 Uhr?"},
            ],
            "started_at": "2026-04-17T09:30:00+02:00",
        },
        patch={"status": "ended", "ended_at": "2026-04-17T09:34:10+02:00", "summary": "Termin am Dienstag, 10 Uhr."},
        bad_enum=("channel", "sms"),
        too_long=("caller", 100),
        required="agent_name",
    ),
    "crm/leads": Case(
        create={
            "full_name": "Amina Benali",
            "email": "amina.benali@example.dz",
            "phone": "+213 555 12 34 56",
            "company": "Benali Import-Export SARL",
            "source": "salon",
            "score": 72,
            "notes": "Rencontrée au salon de l'import, Alger. Intéressée par l'offre PME.",
        },
        patch={"status": "qualified", "score": 85, "phone": None},
        bad_enum=("status", "hot"),
        too_long=("full_name", 255),
        required="status",
    ),
    "crm/deals": Case(
        create={
            "title": "Licence annuelle IAFactory",
            "amount": 12500.5,
            "currency": "DZD",
            "stage": "proposal",
            "expected_close_date": "2026-06-30",
            "metadata": {"owner": "Karim"},
        },
        patch={"stage": "won", "amount": 13000, "expected_close_date": None},
        bad_enum=("currency", "USD"),
        too_long=("title", 255),
        required="amount",
        parents={"lead_id": "lead"},
    ),
    "pme-analyses": Case(
        create={
            "company_name": "Müller Holzbau GmbH",
            "sector": "Bau",
            "fiscal_year": 2025,
            "inputs": {"umsatz": 1850000, "ebitda": 210000, "devise": "CHF"},
            "score": 67.5,
        },
        patch={"status": "completed", "results": {"note": "B+", "risques": ["liquidité"]}, "score": 71.25},
        bad_enum=("status", "done"),
        too_long=("company_name", 255),
        required="company_name",
    ),
}


def test_every_resource_has_a_case() -> None:
    assert set(CASES) == set(SPECS) - {"projects"}


async def with_parents(c: httpx.AsyncClient, case: Case, headers: dict[str, str]) -> dict[str, Any]:
    body = dict(case.create)
    for name, kind in case.parents.items():
        body[name] = await (new_project(c, headers) if kind == "project" else new_lead(c, headers))
    return body


async def test_round_trip(api_world: ApiWorld, subtests: pytest.Subtests) -> None:
    """create → get → list → patch → delete for every resource, in one world (one subtest each)."""
    for name in CASES:
        with subtests.test(resource=name):
            await round_trip(api_world, name)


async def round_trip(api_world: ApiWorld, name: str) -> None:
    c, a, b = api_world.client, api_world.a, api_world.b
    case, spec, url = CASES[name], SPECS[name], f"{API}/{name}"
    member, viewer = a.auth("member"), a.auth("viewer")
    body = await with_parents(c, case, member)
    before = count_rows(api_world.admin_url, spec.table)

    r = await c.post(url, json=body, headers=member)
    assert r.status_code == 201, r.text
    created = r.json()
    assert list(created) == spec.columns and "tenant_id" not in created
    assert_matches(body, created)
    ident = created["id"]

    r = await c.get(f"{url}/{ident}", headers=a.key("read"))
    assert r.status_code == 200 and r.json() == created

    r = await c.get(url, headers=viewer)
    assert r.status_code == 200
    assert r.json()["items"][0] == created  # newest first
    r = await c.get(url, headers=b.auth("owner"))
    assert r.status_code == 200 and r.json()["items"] == []
    assert (await c.get(f"{url}/{ident}", headers=b.auth("owner"))).status_code == 404

    r = await c.patch(f"{url}/{ident}", json=case.patch, headers=member)
    assert r.status_code == 200, r.text
    updated = r.json()
    assert_matches(case.patch, updated)
    untouched = {k: v for k, v in created.items() if k not in case.patch and k != "updated_at"}
    assert_matches(untouched, updated)
    assert updated["updated_at"] >= created["updated_at"]

    r = await c.patch(f"{url}/{ident}", json={case.required: None}, headers=member)
    assert fields(r) == [f"body.{case.required}"]
    assert (await c.patch(f"{url}/{ident}", json=case.patch, headers=viewer)).status_code == 403
    assert (await c.delete(f"{url}/{ident}", headers=b.auth("owner"))).status_code == 404

    assert (await c.delete(f"{url}/{ident}", headers=member)).status_code == 204
    assert (await c.get(f"{url}/{ident}", headers=viewer)).status_code == 404
    assert (await c.delete(f"{url}/{ident}", headers=member)).status_code == 404
    assert count_rows(api_world.admin_url, spec.table) == before


async def test_bad_values_are_422_naming_the_field_and_write_nothing(api_world: ApiWorld) -> None:
    c, a = api_world.client, api_world.a
    owner = a.auth("owner")
    parents = {"project": await new_project(c, owner), "lead": await new_lead(c, owner)}
    for name, case in CASES.items():
        body = {**case.create, **{f: parents[kind] for f, kind in case.parents.items()}}
        url = f"{API}/{name}"
        field_, value = case.bad_enum
        assert fields(await c.post(url, json={**body, field_: value}, headers=owner)) == [f"body.{field_}"], name
        field_, limit = case.too_long
        assert fields(await c.post(url, json={**body, field_: "é" * (limit + 1)}, headers=owner)) == [
            f"body.{field_}"
        ], name
        # The limit itself is accepted: the bound is the column's, not an arbitrary one.
        r = await c.post(url, json={**body, field_: "é" * limit}, headers=owner)
        assert r.status_code == 201, (name, r.text)
    counts = {name: count_rows(api_world.admin_url, SPECS[name].table) for name in CASES}
    assert counts == dict.fromkeys(CASES, 1) | {"crm/leads": 2}, counts

    # Ranges and formats of the SQL, refused before they reach it.
    more = [
        ("crm/leads", {"full_name": "X", "score": 101}, "body.score"),
        ("crm/leads", {"full_name": "X", "email": "pas-une-adresse"}, "body.email"),
        ("crm/deals", {"lead_id": parents["lead"], "title": "X", "amount": -1}, "body.amount"),
        ("crm/deals", {"lead_id": parents["lead"], "title": "X", "amount": 1.005}, "body.amount"),
        ("crm/deals", {"lead_id": parents["lead"], "title": "X", "amount": 10**12}, "body.amount"),
        ("crm/deals", {"lead_id": "not-a-uuid", "title": "X"}, "body.lead_id"),
        ("pme-analyses", {"company_name": "X", "fiscal_year": 1899}, "body.fiscal_year"),
        ("pme-analyses", {"company_name": "X", "score": 100.01}, "body.score"),
        ("voice/transcriptions", {"duration_seconds": -0.5}, "body.duration_seconds"),
        ("voice/conversations", {"agent_name": "X", "started_at": "2026-04-17T09:30:00"}, "body.started_at"),
        ("voice/conversations", {"agent_name": "X", "messages": {"not": "an array"}}, "body.messages"),
        ("orchestrator-state", {"session_key": "s", "agent": "a", "last_step": -1}, "body.last_step"),
        ("bolt-workflows", {"name": "X", "definition": ["not", "an", "object"]}, "body.definition"),
        ("bolt-workflows", {"name": "X", "project_id": 0}, "body.project_id"),
        ("knowledge-base", {"title": "X", "source": "s" * 1001}, "body.source"),
        ("knowledge-base", {"title": "X", "tenant_id": str(api_world.b.id)}, "body.tenant_id"),
    ]
    for name, body, where in more:
        assert fields(await c.post(f"{API}/{name}", json=body, headers=owner)) == [where], (name, body)
    r = await c.post(f"{API}/crm/leads", json={"full_name": "Viewer"}, headers=a.auth("viewer"))
    assert r.status_code == 403


async def test_a_deal_cannot_reference_another_tenants_lead(api_world: ApiWorld) -> None:
    c, a, b = api_world.client, api_world.a, api_world.b
    theirs = await new_lead(c, b.auth("owner"), "Jean Dupont")
    r = await c.post(f"{API}/crm/deals", json={"lead_id": theirs, "title": "Contrat volé"}, headers=a.auth("owner"))
    # Answered like a lead that does not exist: bad input, named by its field.
    assert r.status_code == 422, r.text
    assert [e["field"] for e in r.json()["errors"]] == ["body.lead_id"]
    assert count_rows(api_world.admin_url, "crm_deals") == 0

    ours = await new_lead(c, a.auth("owner"))
    r = await c.post(f"{API}/crm/deals", json={"lead_id": ours, "title": "Contrat"}, headers=a.auth("owner"))
    deal = r.json()
    r = await c.patch(f"{API}/crm/deals/{deal['id']}", json={"lead_id": theirs}, headers=a.auth("owner"))
    assert r.status_code == 422
    r = await c.get(f"{API}/crm/deals/{deal['id']}", headers=a.auth("owner"))
    assert r.json()["lead_id"] == ours


async def test_a_lead_with_deals_cannot_be_deleted(api_world: ApiWorld) -> None:
    # PostgreSQL 18 reports ON DELETE RESTRICT as restrict_violation (23001), 15 as
    # foreign_key_violation (23503): both must answer 409.
    c, owner = api_world.client, api_world.a.auth("owner")
    lead = await new_lead(c, owner)
    r = await c.post(f"{API}/crm/deals", json={"lead_id": lead, "title": "Contrat-cadre"}, headers=owner)
    assert r.status_code == 201
    r = await c.delete(f"{API}/crm/leads/{lead}", headers=owner)
    assert count_rows(api_world.admin_url, "crm_leads", api_world.a.id) == 1
    assert r.status_code == 409 and "still referenced" in r.json()["detail"], r.text


@pytest.mark.parametrize("name", ["bolt-workflows", "bmad-workflows"])
async def test_a_workflow_cannot_reference_another_tenants_project(api_world: ApiWorld, name: str) -> None:
    c, a, b = api_world.client, api_world.a, api_world.b
    theirs = await new_project(c, b.auth("owner"), "Projet confidentiel")
    r = await c.post(f"{API}/{name}", json={"name": "Intrusion", "project_id": theirs}, headers=a.auth("owner"))
    assert r.status_code == 422, r.text
    assert [e["field"] for e in r.json()["errors"]] == ["body.project_id"]
    assert count_rows(api_world.admin_url, SPECS[name].table) == 0

    ours = await new_project(c, a.auth("owner"))
    r = await c.post(f"{API}/{name}", json={"name": "Légitime", "project_id": ours}, headers=a.auth("owner"))
    assert r.status_code == 201
    ident = r.json()["id"]
    r = await c.patch(f"{API}/{name}/{ident}", json={"project_id": theirs}, headers=a.auth("owner"))
    assert r.status_code == 422
    assert (await c.get(f"{API}/{name}/{ident}", headers=a.auth("owner"))).json()["project_id"] == ours
    # Deleting the project takes its workflows with it (ON DELETE CASCADE, same tenant only).
    assert (await c.delete(f"{API}/projects/{ours}", headers=a.auth("owner"))).status_code == 204
    assert (await c.get(f"{API}/{name}/{ident}", headers=a.auth("owner"))).status_code == 404
    assert (await c.get(f"{API}/projects/{theirs}", headers=b.auth("owner"))).status_code == 200


# --- Billing -------------------------------------------------------------------------------------


async def test_a_project_belongs_to_the_user_who_created_it(api_world: ApiWorld) -> None:
    c, a = api_world.client, api_world.a
    for role in ("member", "owner"):
        r = await c.post(f"{API}/projects", json={"name": f"by the {role}"}, headers=a.auth(role))
        assert r.status_code == 201 and r.json()["owner_id"] == a.user_ids[role], r.text
        assert (await c.get(f"{API}/projects/{r.json()['id']}", headers=a.auth("viewer"))).json()[
            "owner_id"
        ] == a.user_ids[role]
    # An API key acts for the tenant, not for a person: no owner.
    r = await c.post(f"{API}/projects", json={"name": "by the integration"}, headers=a.key("write"))
    assert r.status_code == 201 and r.json()["owner_id"] is None, r.text
    # The owner is not the client's to choose (another tenant's user id, for instance).
    r = await c.post(
        f"{API}/projects", json={"name": "x", "owner_id": api_world.b.user_ids["owner"]}, headers=a.auth("member")
    )
    assert fields(r) == ["body.owner_id"]


async def tenant_without_account(world: ApiWorld) -> tuple[uuid.UUID, dict[str, str]]:
    """A new tenant with a single admin, and no billing account (no credits ever granted)."""
    tag = uuid.uuid4().hex[:6]
    email = f"admin-c-{tag}@example.dz"
    async with operator_transaction(world.admin_url) as tx:
        t = await tenancy.create_tenant(
            tx,
            TenantCreate(name="Cabinet Haddad", slug=f"cabinet-haddad-{tag}", region="DZ", plan="pro", status="active"),
        )
        await tenancy.add_member(
            tx, t.slug, email, "admin", name="Samir Haddad", password_hash=await hash_password(world.settings, PASSWORD)
        )
    return t.id, world.headers(await login(world.client, email))


async def test_billing_account_defaults_then_upsert(api_world: ApiWorld) -> None:
    c, a = api_world.client, api_world.a
    tenant_id, admin = await tenant_without_account(api_world)

    r = await c.get(f"{API}/billing-account", headers=admin)
    assert r.status_code == 200
    # An Algerian tenant: the currency of its region (DZD) before anything is saved.
    assert r.json() == {
        "billing_name": "",
        "billing_email": None,
        "address": "",
        "vat_number": None,
        "currency": "DZD",
        "credit_balance": 0,
        "created_at": None,
        "updated_at": None,
    }
    assert (await c.get(f"{API}/credits/balance", headers=admin)).json() == {"balance": 0, "currency": "DZD"}
    assert count_rows(api_world.admin_url, "billing_accounts", tenant_id) == 0

    contact = {
        "billing_name": "Cabinet Haddad & Associés",
        "billing_email": "facturation@haddad.example.dz",
        "address": "12 rue Didouche Mourad\n16000 Alger",
        "vat_number": "NIF 000216001234567",
        "currency": "DZD",
    }
    r = await c.patch(f"{API}/billing-account", json=contact, headers=admin)
    assert r.status_code == 200, r.text
    account = r.json()
    assert_matches(contact, account)
    assert account["credit_balance"] == 0 and account["created_at"] is not None
    assert count_rows(api_world.admin_url, "billing_accounts", tenant_id) == 1

    r = await c.patch(f"{API}/billing-account", json={"vat_number": None, "billing_name": "Haddad SARL"}, headers=admin)
    assert r.status_code == 200
    assert_matches({**contact, "vat_number": None, "billing_name": "Haddad SARL"}, r.json())
    assert (await c.get(f"{API}/credits/balance", headers=admin)).json() == {"balance": 0, "currency": "DZD"}

    # The balance belongs to the ledger; unknown and invalid fields are refused; nothing changes.
    assert fields(await c.patch(f"{API}/billing-account", json={"credit_balance": 10**6}, headers=admin)) == [
        "body.credit_balance"
    ]
    assert fields(await c.patch(f"{API}/billing-account", json={"currency": "USD"}, headers=admin)) == ["body.currency"]
    assert fields(await c.patch(f"{API}/billing-account", json={"currency": None}, headers=admin)) == ["body.currency"]
    assert fields(await c.patch(f"{API}/billing-account", json={"billing_email": "nope"}, headers=admin)) == [
        "body.billing_email"
    ]
    assert fields(await c.patch(f"{API}/billing-account", json={"vat_number": "9" * 51}, headers=admin)) == [
        "body.vat_number"
    ]
    r = await c.get(f"{API}/billing-account", headers=admin)
    assert r.json()["credit_balance"] == 0 and r.json()["currency"] == "DZD"

    # Admins only; and another tenant's account is its own.
    assert (
        await c.patch(f"{API}/billing-account", json={"billing_name": "x"}, headers=a.auth("member"))
    ).status_code == 403
    assert (
        await c.patch(f"{API}/billing-account", json={"billing_name": "x"}, headers=a.key("write"))
    ).status_code == 403
    r = await c.get(f"{API}/billing-account", headers=a.auth("viewer"))
    assert r.status_code == 200 and r.json()["billing_name"] != "Haddad SARL"


async def test_credit_ledger_newest_first_in_pages(api_world: ApiWorld) -> None:
    c, a, b = api_world.client, api_world.a, api_world.b
    # The ledger is written by the platform, not by this API: seed it as the owner would.
    with psycopg.connect(api_world.admin_url) as conn:
        conn.execute("INSERT INTO billing_accounts (tenant_id) VALUES (%s) ON CONFLICT (tenant_id) DO NOTHING", (a.id,))
        balance = conn.execute("SELECT credit_balance FROM billing_accounts WHERE tenant_id = %s", (a.id,)).fetchone()[
            0
        ]
        start = datetime.now(UTC) + timedelta(minutes=1)
        for i, (kind, amount) in enumerate([("grant", 500), ("debit", -10), ("refund", 10)]):
            balance += amount
            conn.execute(
                "INSERT INTO credit_transactions (tenant_id, kind, amount, reason, idempotency_key, balance_after, "
                "created_at) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (a.id, kind, amount, f"écriture {i}", f"test:{i}", balance, start + timedelta(seconds=i)),
            )
        conn.execute("UPDATE billing_accounts SET credit_balance = %s WHERE tenant_id = %s", (balance, a.id))

    r = await c.get(f"{API}/credits", params={"limit": 2}, headers=a.auth("viewer"))
    assert r.status_code == 200, r.text
    page = r.json()
    assert [t["idempotency_key"] for t in page["items"]] == ["test:2", "test:1"]
    assert set(page["items"][0]) == {
        "id",
        "kind",
        "amount",
        "reason",
        "idempotency_key",
        "balance_after",
        "created_by",
        "created_at",
    }
    r = await c.get(f"{API}/credits", params={"limit": 2, "cursor": page["next_cursor"]}, headers=a.key("read"))
    assert next(t["idempotency_key"] for t in r.json()["items"]) == "test:0"
    assert (await c.get(f"{API}/credits/balance", headers=a.auth("viewer"))).json()["balance"] == balance
    assert "test:0" not in {
        t["idempotency_key"] for t in (await c.get(f"{API}/credits", headers=b.auth("viewer"))).json()["items"]
    }
    r = await c.get(f"{API}/credits", params={"cursor": "garbage"}, headers=a.auth("viewer"))
    assert r.status_code == 422 and r.json()["detail"].startswith("query.cursor")


def events(*keys: str, event_type: str = "llm.tokens", **extra: Any) -> dict[str, Any]:
    return {
        "events": [
            {
                "event_type": event_type,
                "quantity": 1250,
                "idempotency_key": k,
                "properties": {"model": "mistral-large", "langue": "fr"},
                **extra,
            }
            for k in keys
        ]
    }


async def test_usage_events_are_idempotent_per_key(api_world: ApiWorld) -> None:
    c, a, b = api_world.client, api_world.a, api_world.b
    member = a.auth("member")
    url = f"{API}/usage-events"

    r = await c.post(url, json=events("k1", "k2", "k3", occurred_at="2026-04-17T08:00:00+02:00"), headers=member)
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": ["k1", "k2", "k3"], "duplicates": []}
    r = await c.post(url, json=events("k1", "k2", "k3"), headers=member)
    assert r.json() == {"accepted": [], "duplicates": ["k1", "k2", "k3"]}

    # A key repeated inside one batch counts once; the first occurrence is the one stored.
    batch = events("k4", "k4", "k1", "k5")
    batch["events"][0]["quantity"] = 7.5
    r = await c.post(url, json=batch, headers=a.key("write"))
    assert r.json() == {"accepted": ["k4", "k5"], "duplicates": ["k1"]}
    assert count_rows(api_world.admin_url, "usage_events", a.id) == 5

    # Keys are per tenant.
    assert (await c.post(url, json=events("k1"), headers=b.auth("member"))).json()["accepted"] == ["k1"]

    # Bounds: 1..1000 events, each validated, the whole batch refused when one event is bad.
    assert fields(await c.post(url, json=events(*(f"b{i}" for i in range(1001))), headers=member)) == ["body.events"]
    assert fields(await c.post(url, json={"events": []}, headers=member)) == ["body.events"]
    bad = events("n1", "n2")
    bad["events"][1]["quantity"] = -1
    assert fields(await c.post(url, json=bad, headers=member)) == ["body.events.1.quantity"]
    assert fields(await c.post(url, json=events("n3", occurred_at="2026-04-17T08:00:00"), headers=member)) == [
        "body.events.0.occurred_at"
    ]
    assert fields(await c.post(url, json=events("x" * 256), headers=member)) == ["body.events.0.idempotency_key"]
    assert fields(await c.post(url, json=events(""), headers=member)) == ["body.events.0.idempotency_key"]
    assert count_rows(api_world.admin_url, "usage_events", a.id) == 5
    r = await c.post(url, json=events(*(f"m{i}" for i in range(1000)), event_type="voice.minutes"), headers=member)
    assert r.status_code == 200 and len(r.json()["accepted"]) == 1000

    # Recording needs a member or a write key.
    assert (await c.post(url, json=events("v1"), headers=a.auth("viewer"))).status_code == 403
    assert (await c.post(url, json=events("v1"), headers=a.key("read"))).status_code == 403

    # Listing: newest first, filtered, paged.
    r = await c.get(url, params={"event_type": "llm.tokens", "limit": 100}, headers=a.auth("viewer"))
    assert r.status_code == 200
    items = r.json()["items"]
    assert sorted(e["idempotency_key"] for e in items) == ["k1", "k2", "k3", "k4", "k5"]
    assert "tenant_id" not in items[0]
    by_key = {e["idempotency_key"]: e for e in items}
    assert by_key["k4"]["quantity"] == 7.5 and by_key["k5"]["quantity"] == 1250
    assert same("2026-04-17T08:00:00+02:00", by_key["k1"]["occurred_at"])
    assert by_key["k1"]["user_id"] == a.user_ids["member"] and by_key["k4"]["api_key_id"] is not None
    assert [e["idempotency_key"] for e in items[:2]] in (["k4", "k5"], ["k5", "k4"])  # the newest batch first
    seen, cursor = [], None
    while True:
        r = await c.get(url, params={"limit": 40, **({"cursor": cursor} if cursor else {})}, headers=a.key("read"))
        seen += [e["idempotency_key"] for e in r.json()["items"]]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 1005
    r = await c.get(url, params={"event_type": "llm.tokens"}, headers=b.auth("viewer"))
    assert [e["idempotency_key"] for e in r.json()["items"]] == ["k1"]
