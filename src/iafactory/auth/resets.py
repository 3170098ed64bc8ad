"""Password reset by email (migration 027).

A request for an email writes a single-use token `pwr_<cell>_<random>` (valid RESET_MINUTES) and
queues the email with its link, in one statement that does the same whether or not the address
has an account: the answer (202, same body) and its cost do not tell. Only an HMAC of the token is
stored; a newer request kills the older token. The token names its cell, like an invitation's, so
the confirmation needs neither the directory nor a tenant.

Cells: each cell where the email has an account writes its own token and queues its own email, and
a token resets only its own cell's account (and ends that account's sessions). No cell may set the
password of an account because another cell said so: the app role gets no such power.
"""

from __future__ import annotations

from iafactory.cells.links import CellToken
from iafactory.config import Settings
from iafactory.http.problems import Problem
from iafactory.notifications.templates import render

RESET_MINUTES = 30
ANSWER = "if an account has this email, a link to choose a new password was sent to it (valid 30 minutes)"


TOKENS = CellToken("pwr", b"iafactory-password-reset", "/reset-password")
new_token, token_cell, link = TOKENS.new, TOKENS.cell, TOKENS.link
digest = TOKENS.digest


def language(accept_language: str | None) -> str | None:
    """The first language the client asks for (the email's; the templates fall back to French)."""
    if not accept_language:
        return None
    return accept_language.split(",", 1)[0].split(";", 1)[0].strip() or None


def message(settings: Settings, token: str, accept_language: str | None) -> tuple[str, str, str, str]:
    """(language, subject, text, html) of the reset email, rendered before anyone knows whether it goes out."""
    m = render("password_reset", language(accept_language), {"link": link(settings, token), "minutes": RESET_MINUTES})
    return m.language, m.subject, m.text, m.html


REFUSALS = {
    "unknown": (404, "Not Found", "this reset link does not exist (or a newer one replaced it)", "reset-unknown"),
    "used": (410, "Gone", "this reset link was used already: ask for a new one", "reset-used"),
    "expired": (410, "Gone", "this reset link has expired: ask for a new one", "reset-expired"),
}


def refused(outcome: str) -> Problem:
    status, title, detail, kind = REFUSALS[outcome]
    return Problem(status, title, detail, type_=kind)
