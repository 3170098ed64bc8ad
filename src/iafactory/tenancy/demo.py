"""The four tenants of the Phase 1 design, loaded as demo data (idempotent)."""

from __future__ import annotations

import psycopg

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


async def load_demo_tenants(conn: psycopg.AsyncConnection) -> int:
    """Create the demo tenants that do not exist yet; returns how many were created."""
    created = 0
    for data in DEMO_TENANTS:
        exists = await (await conn.execute("SELECT 1 FROM tenants WHERE slug = %s", (data.slug,))).fetchone()
        if exists is None:
            await service.create_tenant(conn, data)
            created += 1
    return created
