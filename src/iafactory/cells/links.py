"""Single-use secrets sent by email (invitations, password resets) that name their cell.

`inv_<cell>_<random>`: like an API key's prefix, the cell in the visible part routes the token
without asking the directory; only an HMAC (keyed with the API-key secret, under a label of the
token's kind) is stored, so the database alone cannot use one.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field

from iafactory.config import Settings


@dataclass(frozen=True)
class CellToken:
    kind: str  # the visible prefix, e.g. "inv"
    label: bytes  # the HMAC's label, so one kind's hash never matches another's
    path: str  # where the emailed link opens, below IAFACTORY_PUBLIC_URL
    _shape: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_shape", re.compile(rf"^{self.kind}_([a-z][a-z0-9-]{{0,31}})_([A-Za-z0-9_-]{{43}})$"))

    def new(self, cell: str) -> str:
        return f"{self.kind}_{cell}_{secrets.token_urlsafe(32)}"

    def cell(self, token: str) -> str | None:
        """The cell a well-formed token names (None: not a token of this kind)."""
        match = self._shape.match(token)
        return match.group(1) if match else None

    def digest(self, settings: Settings, token: str) -> bytes:
        key = settings.secret("api_key_secret").encode()
        return hmac.new(key, self.label + b"\0" + token.encode(), hashlib.sha256).digest()

    def link(self, settings: Settings, token: str) -> str:
        return f"{settings.public_url.rstrip('/')}{self.path}?token={token}"
