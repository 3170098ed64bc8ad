"""The demo data (idempotent): the four tenants of the Phase 1 design and a French one, their
owners, a consultant working for tenants in two regions, and a platform operator.

With region cells (`iafactory demo` on the embedded server runs two), each cell loads the tenants
of its regions and the accounts of the people who work for them there: the consultant has one
account in the DZ cell and one in the EU cell (same email, same password); the platform operator
has one in every cell."""

from __future__ import annotations

from uuid import UUID

from iafactory.db.scope import Transaction
from iafactory.tenancy import service
from iafactory.tenancy.schemas import Role, TenantCreate

DEMO_TENANTS = [
    TenantCreate(
        name="École Ibn Khaldoun Alger",
        slug="ecole-ibn-khaldoun-alger",
        region="DZ",
        plan="pro",
        status="active",
        admin_email="admin@ecole-ibn-khaldoun.dz",
        metadata={"type": "school", "students_count": 500, "city": "Alger"},
    ),
    TenantCreate(
        name="Cabinet Dr. Dupont Genève",
        slug="cabinet-dupont-geneve",
        region="CH",
        plan="enterprise",
        status="active",
        admin_email="admin@cabinet-dupont.ch",
        metadata={"type": "medical", "speciality": "general", "city": "Genève"},
    ),
    TenantCreate(
        name="Étude Maître Martin Lausanne",
        slug="etude-martin-lausanne",
        region="CH",
        plan="pro",
        status="active",
        admin_email="contact@etude-martin.ch",
        metadata={"type": "legal", "speciality": "business_law", "city": "Lausanne"},
    ),
    TenantCreate(
        name="Fiduciaire Bernard Zurich",
        slug="fiduciaire-bernard-zurich",
        region="CH",
        plan="enterprise",
        status="active",
        admin_email="info@fiduciaire-bernard.ch",
        metadata={"type": "accounting", "clients_count": 120, "city": "Zurich"},
    ),
    TenantCreate(
        name="Cabinet Lefèvre Expertise Comptable Lyon",
        slug="cabinet-lefevre-lyon",
        region="FR",
        plan="pro",
        status="active",
        admin_email="contact@cabinet-lefevre.fr",
        metadata={"type": "accounting", "clients_count": 80, "city": "Lyon"},
    ),
]


async def load_demo_tenant(tx: Transaction, data: TenantCreate, tenant_id: UUID | None = None) -> bool:
    """Create one demo tenant unless it exists (with `tenant_id`: the id the directory gave it).
    True when it was created."""
    try:
        await service.get_tenant(tx, slug=data.slug)
    except service.TenantNotFound:
        await service.create_tenant(tx, data, tenant_id=tenant_id)
        return True
    return False


async def load_demo_tenants(tx: Transaction) -> int:
    """Create the demo tenants that do not exist yet (one database); returns how many were created."""
    return sum([await load_demo_tenant(tx, data) for data in DEMO_TENANTS])


DEMO_PASSWORD = "iafactory-demo-2026"
# (email, name, [(tenant slug, role)], platform admin)
DEMO_USERS: list[tuple[str, str, list[tuple[str, Role]], bool]] = [
    ("admin@ecole-ibn-khaldoun.dz", "Direction École Ibn Khaldoun", [("ecole-ibn-khaldoun-alger", "owner")], False),
    ("admin@cabinet-dupont.ch", "Dr. Dupont", [("cabinet-dupont-geneve", "owner")], False),
    ("contact@etude-martin.ch", "Maître Martin", [("etude-martin-lausanne", "owner")], False),
    ("info@fiduciaire-bernard.ch", "Fiduciaire Bernard", [("fiduciaire-bernard-zurich", "owner")], False),
    ("contact@cabinet-lefevre.fr", "Cabinet Lefèvre", [("cabinet-lefevre-lyon", "owner")], False),
    # One person in three tenants of two regions (with cells: an account in each cell), who
    # switches with POST /api/v1/auth/select-tenant.
    (
        "consultant@iafactory.ch",
        "Consultant IAFactory",
        [
            ("cabinet-dupont-geneve", "admin"),
            ("fiduciaire-bernard-zurich", "member"),
            ("ecole-ibn-khaldoun-alger", "member"),
        ],
        False,
    ),
    ("platform@iafactory.ch", "Platform operator", [], True),
]


def demo_accounts(slugs: set[str] | None = None) -> list[tuple[str, str, list[tuple[str, Role]], bool]]:
    """The demo users with an account in the database holding the tenants `slugs` (None: all of
    them), with their memberships there. A platform operator has an account everywhere."""
    out = []
    for email, name, memberships, platform_admin in DEMO_USERS:
        here = [(slug, role) for slug, role in memberships if slugs is None or slug in slugs]
        if here or platform_admin:
            out.append((email, name, here, platform_admin))
    return out


async def load_demo_users(tx: Transaction, password_hash: str, slugs: set[str] | None = None) -> None:
    """Create the demo users and memberships of the tenants `slugs` (None: all), in the database
    `tx` writes to (idempotent: existing ones get the demo password)."""
    for email, name, memberships, platform_admin in demo_accounts(slugs):
        for slug, role in memberships:
            await service.add_member(tx, slug, email, role, name=name, password_hash=password_hash)
        if not memberships:
            # A user without a tenant: created through the system-default tenant's registry path.
            await tx.fetchval(
                "SELECT app.register_user(%s, %s, %s) WHERE app.find_user_id(%s) IS NULL",
                (email, name, password_hash, email),
            )
        if platform_admin:
            await service.set_platform_admin(tx, email, True)
