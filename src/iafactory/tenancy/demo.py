"""The four tenants of the Phase 1 design, loaded as demo data (idempotent)."""

from __future__ import annotations

from iafactory.db.scope import Transaction
from iafactory.tenancy import service
from iafactory.tenancy.schemas import TenantCreate

DEMO_TENANTS = [
    TenantCreate(
        name="École Ibn Khaldoun Alger", slug="ecole-ibn-khaldoun-alger", region="DZ", plan="pro",
        status="active", admin_email="admin@ecole-ibn-khaldoun.dz",
        metadata={"type": "school", "students_count": 500, "city": "Alger"},
    ),
    TenantCreate(
        name="Cabinet Dr. Dupont Genève", slug="cabinet-dupont-geneve", region="CH", plan="enterprise",
        status="active", admin_email="admin@cabinet-dupont.ch",
        metadata={"type": "medical", "speciality": "general", "city": "Genève"},
    ),
    TenantCreate(
        name="Étude Maître Martin Lausanne", slug="etude-martin-lausanne", region="CH", plan="pro",
        status="active", admin_email="contact@etude-martin.ch",
        metadata={"type": "legal", "speciality": "business_law", "city": "Lausanne"},
    ),
    TenantCreate(
        name="Fiduciaire Bernard Zurich", slug="fiduciaire-bernard-zurich", region="CH", plan="enterprise",
        status="active", admin_email="info@fiduciaire-bernard.ch",
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
