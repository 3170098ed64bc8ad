"""The four tenants of the Phase 1 design, loaded as demo data (idempotent)."""

from __future__ import annotations

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
]


async def load_demo_tenants(tx: Transaction) -> int:
    """Create the demo tenants that do not exist yet; returns how many were created."""
    created = 0
    for data in DEMO_TENANTS:
        try:
            await service.get_tenant(tx, slug=data.slug)
        except service.TenantNotFound:
            await service.create_tenant(tx, data)
            created += 1
    return created


DEMO_PASSWORD = "iafactory-demo-2026"
# (email, name, [(tenant slug, role)], platform admin)
# (email, name, [(tenant slug, role)], platform admin)
DEMO_USERS: list[tuple[str, str, list[tuple[str, Role]], bool]] = [
    ("admin@ecole-ibn-khaldoun.dz", "Direction École Ibn Khaldoun", [("ecole-ibn-khaldoun-alger", "owner")], False),
    ("admin@cabinet-dupont.ch", "Dr. Dupont", [("cabinet-dupont-geneve", "owner")], False),
    ("contact@etude-martin.ch", "Maître Martin", [("etude-martin-lausanne", "owner")], False),
    ("info@fiduciaire-bernard.ch", "Fiduciaire Bernard", [("fiduciaire-bernard-zurich", "owner")], False),
    # One person in two tenants: switches with POST /api/v1/auth/select-tenant.
    (
        "consultant@iafactory.ch",
        "Consultant IAFactory",
        [("cabinet-dupont-geneve", "admin"), ("fiduciaire-bernard-zurich", "member")],
        False,
    ),
    ("platform@iafactory.ch", "Platform operator", [], True),
]


async def load_demo_users(tx: Transaction, password_hash: str) -> None:
    """Create the demo users and memberships (idempotent: existing ones get the demo password)."""
    for email, name, memberships, platform_admin in DEMO_USERS:
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
