"""Data residency: region cells.

A cell is a PostgreSQL database holding the whole schema and the tenants of the regions it
serves. `IAFACTORY_CELLS` names them; unset, one cell `default` on `DATABASE_URL` (or the embedded
server) serves every region. Each cell records its regions when it is migrated and refuses, in the
database, a tenant of any other region (migration 021).
"""
