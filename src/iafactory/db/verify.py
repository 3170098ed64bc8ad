"""`iafactory verify`: the post-migration checks of the Phase 1 design, run against the catalog."""

from __future__ import annotations

from dataclasses import dataclass

from iafactory.db import catalog
from iafactory.db.migrate import status
from iafactory.db.scope import Conn

DEFAULT_TENANT_ID = "00000000-0000-0000-0000-000000000000"
# The tables of the original single-tenant install, whose rows must now belong to system-default.
LEGACY_TABLES = ("projects", "knowledge_base", "bolt_workflows", "orchestrator_state", "bmad_workflows")
# Every table the Phase 1 design names as tenant-scoped. More may exist; none of these may be missing.
REQUIRED_TENANT_TABLES = (
    *LEGACY_TABLES,
    "tenant_users",
    "api_keys",
    "usage_events",
    "voice_transcriptions",
    "voice_conversations",
    "crm_leads",
    "crm_deals",
    "billing_accounts",
    "credit_transactions",
    "pme_analyses",
)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


async def run_checks(conn: Conn) -> list[Check]:
    checks: list[Check] = []
    statuses = await status(conn)
    not_applied = [f"{s.version} ({s.state})" for s in statuses if s.state != "applied"]
    checks.append(Check("migrations applied", not not_applied, ", ".join(not_applied) or f"{len(statuses)} applied"))

    if not await catalog.table_exists(conn, "tenants"):
        checks.append(Check("tenants table", False, "table tenants does not exist: run `iafactory migrate`"))
        return checks
    row = await (
        await conn.execute(
            "SELECT count(*) AS n, count(*) FILTER (WHERE id = %s) AS d FROM tenants", (DEFAULT_TENANT_ID,)
        )
    ).fetchone()
    assert row is not None  # an aggregate returns one row
    # The system tenant (region CH) lives in the cell serving CH; a cell of other regions drops it.
    serves_ch = True
    if await catalog.table_exists(conn, "cell_regions"):
        found = await (await conn.execute("SELECT count(*) AS n FROM cell_regions WHERE region = 'CH'")).fetchone()
        serves_ch = bool(found and found["n"])
    if serves_ch:
        checks.append(
            Check(
                "tenants exist",
                row["n"] >= 1 and row["d"] == 1,
                f"{row['n']} tenant(s), system-default {'present' if row['d'] else 'MISSING'}",
            )
        )
    else:
        checks.append(Check("tenants exist", True, f"{row['n']} tenant(s) (a cell not serving CH: no system-default)"))

    tenant_tables = await catalog.tenant_tables(conn)
    missing = [t for t in REQUIRED_TENANT_TABLES if t not in tenant_tables]
    checks.append(
        Check(
            "tenant_id on every tenant table",
            not missing,
            f"missing on: {', '.join(missing)}" if missing else f"{len(tenant_tables)} tables",
        )
    )

    bad_columns = [t for t, info in tenant_tables.items() if info.nullable or not info.references_tenants]
    checks.append(Check("tenant_id NOT NULL and referencing tenants", not bad_columns, ", ".join(bad_columns) or "all"))

    indexes = await catalog.valid_indexes(conn)
    no_index = [t for t in tenant_tables if f"idx_{t}_tenant_created" not in indexes]
    checks.append(
        Check(
            "index (tenant_id, created_at DESC) present and valid",
            not no_index,
            f"missing on: {', '.join(no_index)}" if no_index else f"{len(tenant_tables)} indexes",
        )
    )

    nulls = {}
    for table in tenant_tables:
        row = await (await conn.execute(f'SELECT count(*) AS n FROM "{table}" WHERE tenant_id IS NULL')).fetchone()
        assert row is not None  # an aggregate returns one row
        if row["n"]:
            nulls[table] = row["n"]
    checks.append(
        Check("no NULL tenant_id", not nulls, ", ".join(f"{t}: {n}" for t, n in nulls.items()) or "0 everywhere")
    )

    counts = []
    for table in LEGACY_TABLES:
        if table in tenant_tables:
            r = await (
                await conn.execute(
                    f'SELECT count(*) AS total, count(*) FILTER (WHERE tenant_id = %s) AS default_rows FROM "{table}"',
                    (DEFAULT_TENANT_ID,),
                )
            ).fetchone()
            assert r is not None  # an aggregate returns one row
            counts.append(f"{table} {r['default_rows']}/{r['total']}")
    checks.append(
        Check(
            "existing data assigned to system-default",
            not nulls and len(counts) == len(LEGACY_TABLES),
            "; ".join(counts) + " rows on system-default",
        )
    )
    return checks
