"""API keys: `iaf_live_<cell>_<id>_<secret><checksum>` (with one cell: `iaf_live_<id>_...`).

The prefix (`iaf_live_<cell>_<id>`) is public: it is stored, shown in listings and used to find
the key; its cell routes the key without asking the directory (as GitLab's cell-routable tokens).
The whole key is stored only as an HMAC-SHA256 with a server secret. A CRC32 checksum at the end
lets secret scanners (and our own parser) reject a mistyped or made-up key without a database
lookup.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
import zlib

from iafactory.config import Settings

_ALPHABET = string.ascii_letters + string.digits
_KEY = re.compile(r"^iaf_(live|test)_(?:([a-z][a-z0-9-]{0,31})_)?([a-z0-9]{10})_([A-Za-z0-9]{32})([A-Za-z0-9]{6})$")


def _base62(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 62)
        out.append(_ALPHABET[r])
    return "".join(reversed(out))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), 6)


def generate(settings: Settings, cell: str | None = None) -> tuple[str, str]:
    """A new (key, prefix); `cell` names the key's cell in its prefix (None: one cell, no name)."""
    key_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(10))
    where = f"{cell}_" if cell else ""
    prefix = f"iaf_{settings.api_key_environment}_{where}{key_id}"
    body = f"{prefix}_{''.join(secrets.choice(_ALPHABET) for _ in range(32))}"
    return body + _checksum(body), prefix


def looks_like_key(value: str) -> bool:
    return value.startswith("iaf_")


def parse_prefix(value: str) -> tuple[str, str | None] | None:
    """(prefix, cell named in it or None) of a well-formed key whose checksum matches, else None."""
    match = _KEY.match(value)
    if not match or _checksum(value[:-6]) != match.group(5):
        return None
    return value[: match.end(3)], match.group(2)


def digest(settings: Settings, key: str) -> bytes:
    return hmac.new(settings.secret("api_key_secret").encode(), key.encode(), hashlib.sha256).digest()


def matches(settings: Settings, key: str, stored: bytes) -> bool:
    return hmac.compare_digest(digest(settings, key), bytes(stored))
