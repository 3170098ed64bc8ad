"""CRUD for the tenant-owned record types. Each domain package declares a `Resource` (its table
and its schemas); this package turns it into SQL (repository.py) and routes (router.py)."""

from iafactory.resources.spec import Resource

__all__ = ["Resource"]
