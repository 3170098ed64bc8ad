"""The texts of the emails, in French and English, and how they become a message.

Each text is written once, as plain text (`string.Template`, `$name` placeholders); the HTML part
is derived from it: paragraphs become `<p>`, a paragraph that is only a link becomes a link, and
every value is escaped. One source per language keeps the two parts (and the translations) from
drifting apart, and no template engine is needed.

A message is rendered when it is queued (`outbox.enqueue`), so the outbox holds exactly what will
be sent, and a missing value fails the action that queued it, not a sender later.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from dataclasses import dataclass
from string import Template

LANGUAGES = ("fr", "en")
# The platform's customers (Switzerland, France, Belgium, Algeria, Canada) read French first.
DEFAULT_LANGUAGE = "fr"
PRODUCT = "IAFactory"

_URL = re.compile(r"https?://\S+")


@dataclass(frozen=True)
class Text:
    subject: str
    body: str


@dataclass(frozen=True)
class Rendered:
    subject: str
    text: str
    html: str
    language: str


# kind -> language -> text. The values each kind needs are the $names in its texts (see KINDS).
TEXTS: dict[str, dict[str, Text]] = {
    # An invitation to join a tenant: inviter, tenant, role, link, days (the link's validity).
    "invitation": {
        "fr": Text(
            "$inviter vous invite à rejoindre $tenant sur $product",
            """Bonjour,

$inviter vous invite à rejoindre $tenant sur $product (rôle : $role).

Pour accepter l'invitation, ouvrez ce lien, valable $days jours :

$link

Si vous n'attendiez pas cette invitation, ignorez simplement ce message.""",
        ),
        "en": Text(
            "$inviter invited you to join $tenant on $product",
            """Hello,

$inviter invited you to join $tenant on $product (role: $role).

To accept the invitation, open this link, valid for $days days:

$link

If you were not expecting this invitation, you can ignore this message.""",
        ),
    },
    # A password reset was asked for this address: link, minutes (the link's validity).
    "password_reset": {
        "fr": Text(
            "Réinitialisation de votre mot de passe $product",
            """Bonjour,

Une réinitialisation du mot de passe de votre compte $product a été demandée. Pour choisir un
nouveau mot de passe, ouvrez ce lien, valable $minutes minutes et une seule fois :

$link

Toutes vos sessions ouvertes seront fermées. Si vous n'avez rien demandé, ignorez ce message :
votre mot de passe reste inchangé.""",
        ),
        "en": Text(
            "Reset your $product password",
            """Hello,

Someone asked to reset the password of your $product account. To choose a new password, open
this link, valid for $minutes minutes and only once:

$link

All your open sessions will be signed out. If you did not ask for this, ignore this message: your
password stays as it is.""",
        ),
    },
    # A new account's address must be confirmed: link.
    "verify_email": {
        "fr": Text(
            "Confirmez votre adresse pour $product",
            """Bonjour,

Pour confirmer que cette adresse est bien la vôtre et terminer la création de votre compte
$product, ouvrez ce lien :

$link

Si vous n'avez pas créé de compte, ignorez ce message.""",
        ),
        "en": Text(
            "Confirm your address for $product",
            """Hello,

To confirm that this address is yours and finish creating your $product account, open this link:

$link

If you did not create an account, ignore this message.""",
        ),
    },
    # Someone tried to register an address that already has an account: link (sign in), reset_link.
    "account_exists": {
        "fr": Text(
            "Vous avez déjà un compte $product",
            """Bonjour,

Quelqu'un (peut-être vous) a voulu créer un compte $product avec cette adresse, qui en a déjà un.
Pour vous connecter :

$link

Mot de passe oublié ? Choisissez-en un nouveau ici :

$reset_link

Si ce n'était pas vous, ignorez ce message : rien n'a changé.""",
        ),
        "en": Text(
            "You already have a $product account",
            """Hello,

Someone (perhaps you) tried to create a $product account with this address, which already has
one. To sign in:

$link

Forgot your password? Choose a new one here:

$reset_link

If this was not you, ignore this message: nothing has changed.""",
        ),
    },
}

# The values each kind needs (besides $product, always filled in).
KINDS: dict[str, frozenset[str]] = {
    kind: frozenset(
        name
        for text in texts.values()
        for part in (text.subject, text.body)
        for name in Template(part).get_identifiers()
        if name != "product"
    )
    for kind, texts in TEXTS.items()
}


def language(*candidates: str | None) -> str:
    """The first supported language among `candidates` ('fr-CH' counts as 'fr'; e.g. the tenant's
    settings, then the person's), else the default."""
    for candidate in candidates:
        code = (candidate or "").strip().lower()[:2]
        if code in LANGUAGES:
            return code
    return DEFAULT_LANGUAGE


def render(kind: str, lang: str | None, context: Mapping[str, object]) -> Rendered:
    """The message of `kind` in `lang` (or the default language), with `context`'s values.
    ValueError names an unknown kind or a missing value."""
    texts = TEXTS.get(kind)
    if texts is None:
        raise ValueError(f"unknown email kind {kind!r} (known: {', '.join(sorted(TEXTS))})")
    missing = KINDS[kind] - context.keys()
    if missing:
        raise ValueError(f"email {kind!r} needs {', '.join(sorted(missing))}")
    code = language(lang)
    text = texts[code]
    values = {"product": PRODUCT, **{k: str(v) for k, v in context.items()}}
    # A header is one line: a value with a line break (a tenant's name?) must not add headers.
    subject = " ".join(Template(text.subject).substitute(values).split())
    body = Template(text.body).substitute(values)
    return Rendered(subject=subject, text=body, html=to_html(body, subject, code), language=code)


def to_html(text: str, title: str, lang: str) -> str:
    """The HTML part of a plain-text message: one `<p>` per paragraph (its lines, wrapped for plain
    text, joined: a mail reader wraps HTML itself), and a paragraph that is only a web address made
    a link. Everything is escaped."""
    paragraphs = []
    for paragraph in re.split(r"\n\s*\n", text.strip()):
        stripped = paragraph.strip()
        if _URL.fullmatch(stripped):
            url = html.escape(stripped, quote=True)
            paragraphs.append(f'<p><a href="{url}">{url}</a></p>')
        else:
            paragraphs.append("<p>" + html.escape(" ".join(line.strip() for line in paragraph.splitlines())) + "</p>")
    body = "\n".join(paragraphs)
    return (
        f'<!DOCTYPE html>\n<html lang="{lang}">\n<head><meta charset="utf-8"><title>{html.escape(title)}</title></head>\n'
        f'<body style="font-family: sans-serif; line-height: 1.5">\n{body}\n</body>\n</html>\n'
    )


def links(text: str) -> list[str]:
    """The web addresses in a message (what the log shows when there is no SMTP server)."""
    return _URL.findall(text)
