"""Registration that does not tell whether an email has an account, and email verification
(migration 029).

`POST /auth/register` answers 202 with the same body and headers for every well-formed request,
and does the same work either way (the password is hashed, both emails are rendered, one database
statement runs): an unknown email gets a new, unverified account and the email "verify your
address" with a single-use link `eml_<cell>_<random>` valid VERIFY_HOURS (only an HMAC stored); a
known one is left as it is and gets "you already have an account" (a sign-in and a reset link).
Only the mailbox's owner learns which. The verification link proves the address: an unverified
account signs in, but creates no tenant until it has opened it.
"""

from __future__ import annotations

from dataclasses import dataclass

from iafactory.auth.resets import language
from iafactory.cells.links import CellToken
from iafactory.config import Settings
from iafactory.http.problems import Problem
from iafactory.notifications.templates import Rendered, render

VERIFY_HOURS = 24
ANSWER = (
    "check your mailbox: we sent a message to this address, with a link to confirm it (valid 24 hours) "
    "or, if it already has an account, how to sign in"
)

TOKENS = CellToken("eml", b"iafactory-email-verification", "/verify-email")
new_token, token_cell, link = TOKENS.new, TOKENS.cell, TOKENS.link
digest = TOKENS.digest


@dataclass(frozen=True)
class Messages:
    verify: Rendered  # to a new account
    exists: Rendered  # to an address that has one already


def verify_message(settings: Settings, token: str, accept_language: str | None) -> Rendered:
    return render("verify_email", language(accept_language), {"link": link(settings, token)})


def messages(settings: Settings, token: str, accept_language: str | None) -> Messages:
    """Both emails of a registration, rendered before anyone knows which one goes out."""
    base = settings.public_url.rstrip("/")
    exists = render(
        "account_exists",
        language(accept_language),
        {"link": f"{base}/sign-in", "reset_link": f"{base}/reset-password"},
    )
    return Messages(verify_message(settings, token, accept_language), exists)


def parts(message: Rendered) -> tuple[str, str, str, str]:
    return message.language, message.subject, message.text, message.html


REFUSALS = {
    "unknown": (
        404,
        "Not Found",
        "this verification link does not exist",
        "verify-unknown",
    ),
    "used": (410, "Gone", "this verification link was used already, or a newer one replaced it", "verify-used"),
    "expired": (410, "Gone", "this verification link has expired: sign in and ask for a new one", "verify-expired"),
}


def refused(outcome: str) -> Problem:
    status, title, detail, kind = REFUSALS[outcome]
    return Problem(status, title, detail, type_=kind)
