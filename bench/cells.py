"""Region cells.

    python bench/cells.py [--rows 100000] [--database-url URL]

`bench_move()`: moving a tenant with ROWS rows spread over its tables (projects, CRM leads, usage
and audit events) from a DZ cell to a CH cell, with `iafactory tenants move`'s own code: the total
time of the move and how long the tenant was read-only (the journal's frozen_at → unfrozen_at).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import BENCH_SECRET_ENV, bench_settings, create_database, drop_database, server_url
from iafactory.db.scope import operator_transaction
from iafactory.tenancy.context import TenantContext

SLUG = "bench-move"


def _cli(urls: dict[str, str], cells: str, *args: str) -> None:
    exe = Path(sys.executable).with_name("iafactory")
    env = {**os.environ, **BENCH_SECRET_ENV, "DATABASE_URL": urls["directory"], "IAFACTORY_CELLS": cells}
    done = subprocess.run([str(exe), *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"iafactory {' '.join(args)}: {done.stderr.strip()}")


async def _fill(dz: str, rows: int) -> str:
    """ROWS rows for the tenant, as the owner in bulk mode (no plan limit, no debit)."""
    async with operator_transaction(dz) as tx:
        tenant_id = await tx.fetchval("SELECT id FROM tenants WHERE slug = %s", (SLUG,))
    share = {"projects": rows // 5, "crm_leads": rows // 5, "usage_events": rows * 2 // 5}
    share["audit_events"] = rows - sum(share.values())
    async with operator_transaction(dz, TenantContext(tenant_id=tenant_id), bulk=True) as tx:
        await tx.execute(
            "INSERT INTO projects (tenant_id, name, description) "
            "SELECT %s, 'project ' || g, repeat('x', 100) FROM generate_series(1, %s) g",
            (tenant_id, share["projects"]),
        )
        await tx.execute(
            "INSERT INTO crm_leads (tenant_id, full_name, email, company) "
            "SELECT %s, 'Lead ' || g, 'lead' || g || '@example.dz', 'Société ' || g FROM generate_series(1, %s) g",
            (tenant_id, share["crm_leads"]),
        )
        await tx.execute(
            "INSERT INTO usage_events (tenant_id, event_type, quantity, idempotency_key, properties) "
            "SELECT %s, 'api.call', 1, 'k' || g, jsonb_build_object('n', g) FROM generate_series(1, %s) g",
            (tenant_id, share["usage_events"]),
        )
        await tx.execute(
            "INSERT INTO audit_events (tenant_id, action, details) "
            "SELECT %s, 'bench.event', jsonb_build_object('n', g) FROM generate_series(1, %s) g",
            (tenant_id, share["audit_events"]),
        )
    return str(tenant_id)


def bench_move(database_url: str | None = None, rows: int = 100_000) -> dict[str, Any]:
    """Move time and write-freeze duration for a tenant with `rows` rows; prints and returns them."""
    from iafactory.cells.move import move_tenant

    url = server_url(database_url)
    names: dict[str, str] = {}
    urls: dict[str, str] = {}
    for role in ("directory", "dz", "eu"):
        names[role], urls[role] = create_database(url, f"bench_cells_{role}")
    cells = json.dumps(
        {"dz": {"url": urls["dz"], "regions": ["DZ"]}, "eu": {"url": urls["eu"], "regions": ["CH", "FR", "BE", "CA"]}}
    )
    try:
        _cli(urls, cells, "migrate")
        _cli(urls, cells, "tenants", "create", "--name", "Bench", "--slug", SLUG, "--region", "DZ", "--plan", "pro")
        asyncio.run(_fill(urls["dz"], rows))
        settings = bench_settings(urls["directory"], cells=cells)
        started = time.perf_counter()
        move = asyncio.run(move_tenant(settings, SLUG, "CH", say=lambda _: None))
        total = time.perf_counter() - started
        frozen = (move.unfrozen_at - move.frozen_at).total_seconds()
        moved = sum(t["rows"] for t in move.checksums["target"].values())
        print(
            f"move of a tenant with {moved} rows (DZ cell → CH cell): {total:.2f} s; writes refused for {frozen:.2f} s"
        )
        return {"rows": moved, "move_seconds": total, "freeze_seconds": frozen}
    finally:
        for name in names.values():
            drop_database(url, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--database-url")
    args = parser.parse_args()
    bench_move(args.database_url, args.rows)


if __name__ == "__main__":
    main()
