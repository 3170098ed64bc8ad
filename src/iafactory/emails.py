"""Email addresses that identify people: one spelling per address, and no look-alikes.

Every address that names an account or a tenant's contact goes through `normalize_email` before
it is looked up or stored (register, login, adding a member by email, `tenants add-user`, a
tenant's admin_email):

* NFKC, then case folding, then NFKC again (Unicode's NFKC_Casefold): fullwidth `ａｄｍｉｎ`,
  mathematical `𝐚𝐝𝐦𝐢𝐧` and `ADMIN` all become `admin`. The local part is folded too: RFC 5321
  lets a server tell `Jean` from `jean`, but no mail provider our customers use does, and one
  account per person matters more. (Accounts were already unique on lower(email).)
* The domain is checked and mapped by IDNA (UTS #46, through email-validator) and kept in its
  Unicode form; `xn--` spellings of the same domain give the same result.
* Refused, with a message naming the field (422 over HTTP, `error:` in the CLI): a local part or
  domain label that mixes scripts (Latin `admin` with a Cyrillic `а` or a Greek `ο`), following
  UTS #39's "highly restrictive" profile (Latin may only be combined with Han and the Japanese or
  Korean scripts); and a label written entirely in Cyrillic or Greek letters that all look Latin
  (`раураl`) when the domain's top-level label is ASCII, which is the rule browsers apply to
  domain names.

Addresses already stored are untouched; they are lowercase ASCII in practice, and lookups compare
lower(email), so they keep matching.
"""

from __future__ import annotations

import unicodedata
from typing import Annotated

import email_validator
from pydantic import AfterValidator, Field, WithJsonSchema

# Scripts that UTS #39 ("highly restrictive") lets appear together in one identifier.
ALLOWED_MIXES = (
    frozenset({"LATIN", "HAN", "HIRAGANA", "KATAKANA"}),
    frozenset({"LATIN", "HAN", "BOPOMOFO"}),
    frozenset({"LATIN", "HAN", "HANGUL"}),
)
# Lowercase Cyrillic and Greek letters that are drawn like Latin ones.
LATIN_LOOKALIKES = {
    "CYRILLIC": frozenset("аԁеһіјӏорԛѕԝхуսпгԍѵѡ"),
    "GREEK": frozenset("αικνορτυχϲ"),
}


def _script(ch: str) -> str | None:
    """The script of a letter, from its Unicode name; None for digits, marks and punctuation
    (Unicode's Common and Inherited scripts). The standard library has no Script property; the
    name's first word is that script for every letter that survives NFKC."""
    if not ch.isalpha():
        return None
    name = unicodedata.name(ch, "")
    if name.startswith(("CJK ", "IDEOGRAPHIC")):
        return "HAN"
    first = name.split(" ", 1)[0]
    return None if first in ("", "MODIFIER") else first


def _nfkc_casefold(value: str) -> str:
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", value).casefold())


def look_alike_problem(part: str, what: str, ascii_tld: bool) -> str | None:
    scripts = {s for s in map(_script, part) if s is not None}
    if len(scripts) > 1 and not any(scripts <= allowed for allowed in ALLOWED_MIXES):
        names = " and ".join(sorted(s.title() for s in scripts))
        return f"the {what} mixes {names} letters, which makes it look like another address"
    if ascii_tld and len(scripts) == 1:
        (script,) = scripts
        lookalikes = LATIN_LOOKALIKES.get(script)
        letters = [ch for ch in part if ch.isalpha()]
        if lookalikes is not None and all(ch in lookalikes for ch in letters):
            return (
                f"the {what} is written in {script.title()} letters that look like Latin ones, which makes "
                "it look like another address"
            )
    return None


def normalize_email(value: str) -> str:
    """The one stored spelling of an address, or ValueError saying what is wrong with it."""
    folded = _nfkc_casefold(value.strip())
    try:
        info = email_validator.validate_email(folded, check_deliverability=False)
    except email_validator.EmailNotValidError as err:
        raise ValueError(f"not a valid email address: {err}") from err
    local, domain = _nfkc_casefold(info.local_part), info.domain
    ascii_tld = domain.rsplit(".", 1)[-1].isascii()
    problem = look_alike_problem(local, "local part", ascii_tld)
    for label in domain.split("."):
        problem = problem or look_alike_problem(label, f"domain label {label!r}", ascii_tld)
    if problem:
        raise ValueError(problem)
    return f"{local}@{domain}"


# The request and CLI type for such addresses (documented as a plain email in OpenAPI).
Email = Annotated[
    str,
    Field(min_length=3, max_length=320),
    AfterValidator(normalize_email),
    WithJsonSchema(
        {
            "type": "string",
            "format": "email",
            "maxLength": 254,
            "description": "Compared and stored in NFKC, case-folded form; look-alike spellings "
            "that mix scripts are refused.",
        }
    ),
]
