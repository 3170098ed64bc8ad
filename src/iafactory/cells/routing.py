"""Which pool serves a request: one per cell, and the directory's.

A credential names its cell (a token's `cell` claim, an API key's prefix); `CellPools.route`
says where the directory puts the tenant. They must agree, or the request is refused — never
answered from some default database. Routes are cached for a minute: a claim that disagrees
with the cache is checked against the directory itself before being refused, and the cell's own
gate (`app.authorize`) refuses a tenant it does not hold (a moved tenant's source copy is frozen,
then erased), so a stale entry can never serve another cell's data. A 5 s cache cost ~5% of
throughput with 200 busy tenants (bench/cells.py): one request in seven paid a directory trip.
"""

from __future__ import annotations

import time
from uuid import UUID

from iafactory.cells import directory
from iafactory.cells.directory import Route
from iafactory.config import Settings
from iafactory.db.scope import Database

ROUTE_CACHE_SECONDS = 60.0


class UnknownCell(LookupError):
    pass


class CellPools:
    """The service's databases. With one cell there is no directory: every tenant is in it."""

    def __init__(self, dbs: dict[str, Database], directory_db: Database | None = None) -> None:
        if not dbs:
            raise ValueError("at least one cell")
        self.dbs = dbs
        self.directory_db = directory_db
        self._routes: dict[UUID, tuple[float, Route | None]] = {}

    @property
    def single(self) -> bool:
        return self.directory_db is None

    @property
    def home(self) -> str:
        """The cell of a credential that names none (tokens and keys from before cells)."""
        return next(iter(self.dbs))

    def db(self, cell: str) -> Database:
        try:
            return self.dbs[cell]
        except KeyError:
            raise UnknownCell(cell) from None

    def all(self) -> list[Database]:
        """Every pool, the directory's first."""
        return [*([self.directory_db] if self.directory_db is not None else []), *self.dbs.values()]

    async def route(self, tenant_id: UUID, *, fresh: bool = False) -> Route | None:
        """The directory's route for a tenant (None: unknown). With one cell, that cell."""
        if self.directory_db is None:
            return Route(tenant_id, "", "", self.home, "", "")
        now = time.monotonic()
        hit = self._routes.get(tenant_id)
        if hit is not None and hit[0] > now and not fresh:
            return hit[1]
        async with self.directory_db.anonymous(read_only=True) as tx:
            found = await directory.route(tx, tenant_id=tenant_id)
        self._routes[tenant_id] = (now + ROUTE_CACHE_SECONDS, found)
        if len(self._routes) > 100_000:
            self._routes.clear()
        return found

    def forget(self, tenant_id: UUID) -> None:
        self._routes.pop(tenant_id, None)

    async def login_cells(self, settings: Settings, email: str) -> list[str]:
        """The cells where `email` has an account, as far as the directory knows."""
        if self.directory_db is None:
            return [self.home]
        async with self.directory_db.anonymous(read_only=True) as tx:
            return [c for c in await directory.login_cells(tx, settings, email) if c in self.dbs]

    async def moved_key_cell(self, prefix: str) -> str | None:
        if self.directory_db is None:
            return None
        async with self.directory_db.anonymous(read_only=True) as tx:
            return await directory.moved_key_cell(tx, prefix)

    async def open(self) -> None:
        for db in self.all():
            await db.open()

    async def close(self) -> None:
        for db in self.all():
            await db.close()
