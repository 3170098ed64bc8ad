"""The tenant context: what a request's credential resolved to.

It is the only thing that picks a tenant. It is built from a verified credential (JWT or API
key, see `iafactory.auth`) or, for operator commands, from a tenant looked up by slug; then it
is handed to `iafactory.db.scope.Database.tenant`, which sets it for one transaction.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache
from uuid import UUID

ROLES = ("viewer", "member", "admin", "owner")
ROLE_RANK = {role: rank for rank, role in enumerate(ROLES)}
_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@lru_cache(maxsize=4096)
def canonical_ip(value: str) -> str:
    """The canonical text of an IP address; ValueError if `value` is not one. Cached: the standard
    library's parser costs more than the rest of building a request's context."""
    return str(ipaddress.ip_address(value))


@dataclass(frozen=True, slots=True)
class TenantContext:
    tenant_id: UUID
    user_id: int | None = None
    api_key_id: UUID | None = None
    role: str | None = None
    # Scope of an API key ("read" or "write"); None for a user session.
    key_scope: str | None = None
    # Request metadata the audit log records.
    client_ip: str | None = None
    request_id: str | None = None

    def __post_init__(self) -> None:
        # A real UUID object, never a string: it is interpolated into SET LOCAL, which takes no
        # bind parameters. Its canonical str() cannot carry anything but hex digits and dashes.
        if not isinstance(self.tenant_id, UUID):
            raise TypeError("TenantContext.tenant_id must be a uuid.UUID")
        if self.role is not None and self.role not in ROLE_RANK:
            raise ValueError(f"unknown role {self.role!r}")
        ip, request_id = request_metadata(self.client_ip, self.request_id)
        object.__setattr__(self, "client_ip", ip)
        object.__setattr__(self, "request_id", request_id)


def request_metadata(client_ip: str | None, request_id: str | None) -> tuple[str | None, str | None]:
    """The client address and request id a scope records (SET LOCAL, read by the audit log),
    checked here because SET LOCAL takes no bind parameters: an IP in canonical form, an id of
    1-64 letters, digits, '-' or '_'. Raises ValueError otherwise."""
    if client_ip is not None:
        client_ip = canonical_ip(client_ip)
    if request_id is not None and not _REQUEST_ID.fullmatch(request_id):
        raise ValueError("request_id must be 1-64 letters, digits, '-' or '_'")
    return client_ip, request_id
