"""The password policy (OWASP ASVS 5.0 V6.2), wherever a password is chosen: registration, an
operator's `tenants add-user --password-stdin`, a password change.

* Length: at least MIN_LENGTH characters (ASVS: at least 8, 15 recommended), up to MAX_LENGTH
  (ASVS: at least 64 must be allowed). Any character, spaces included; no composition rules and no
  forced rotation (ASVS 6.2.5, 6.2.10).
* Not a common password (ASVS 6.2.4): the 30,000 of zxcvbn's frequency list, shipped in
  data/common-passwords.txt.gz (the file names its source), compared without case.
* Not trivially guessable from its shape: blank, one short pattern repeated (`aaaaaaaaaa`,
  `abcabcabcabc`), or a run of consecutive characters (`1234567890`, `abcdefghij`, `9876543210`).
* Not the account's own email or its local part (ASVS 6.2.11, context-specific words).
"""

from __future__ import annotations

import gzip
import itertools
from functools import lru_cache
from importlib import resources

MIN_LENGTH = 10
MAX_LENGTH = 128


@lru_cache(maxsize=1)
def common_passwords() -> frozenset[str]:
    raw = resources.files("iafactory.auth").joinpath("data/common-passwords.txt.gz").read_bytes()
    lines = gzip.decompress(raw).decode().splitlines()
    return frozenset(line for line in lines if line and not line.startswith("#"))


def _repeated(password: str) -> bool:
    n = len(password)
    return any(n % size == 0 and password == password[:size] * (n // size) for size in range(1, n // 2 + 1))


def _sequence(password: str) -> bool:
    steps = {ord(b) - ord(a) for a, b in itertools.pairwise(password)}
    return len(steps) == 1 and steps.pop() in (1, -1)


def problem(password: str, email: str | None = None) -> str | None:
    """Why `password` is refused, or None. The length bounds are the schema's (checked first)."""
    if not password.strip():
        return "the password cannot be only spaces"
    if _repeated(password):
        return "the password is a repeated pattern: choose a longer passphrase"
    if _sequence(password) or _sequence(password.lower()):
        return "the password is a simple sequence of characters: choose a longer passphrase"
    if password.lower() in common_passwords() or password.strip().lower() in common_passwords():
        return "this password is among the most common ones: choose another (a passphrase of a few words works well)"
    if email:
        lowered = password.lower()
        local = email.lower().split("@", 1)[0]
        if lowered == email.lower() or lowered == local:
            return "the password cannot be your email address"
    return None


def check(password: str, email: str | None = None) -> str:
    """For pydantic validators: `password`, or ValueError saying why it is refused."""
    reason = problem(password, email)
    if reason is not None:
        raise ValueError(reason)
    return password
