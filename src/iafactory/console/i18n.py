"""The console's languages: French, English and Arabic (right to left).

The language comes from the `iaf_lang` cookie (set by the language switcher), else from the
browser's Accept-Language, else English. Strings live in iafactory.console.messages (one dict per
language, no build step); dates and numbers are formatted by Babel in the locale of the request
(the Accept-Language tag when it is of the chosen language, e.g. fr-CH, else the language's own).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal

from babel import Locale, UnknownLocaleError
from babel.dates import format_date, format_datetime, format_skeleton
from babel.numbers import format_decimal, format_percent
from babel.units import format_unit

from iafactory.console.messages import MESSAGES

LANGUAGES = ("fr", "en", "ar")
DEFAULT = "en"
RTL = frozenset({"ar"})
LANG_COOKIE = "iaf_lang"
# The name of each language in itself, for the switcher.
NATIVE = {"fr": "Français", "en": "English", "ar": "العربية"}


def _accepted(header: str | None) -> list[str]:
    """The tags of an Accept-Language header, best first (q=0 left out)."""
    tags: list[tuple[float, int, str]] = []
    for index, part in enumerate((header or "").split(",")):
        tag, _, params = part.strip().partition(";")
        q = 1.0
        if params.strip().startswith("q="):
            try:
                q = float(params.strip()[2:])
            except ValueError:
                q = 0.0
        if tag and q > 0:
            tags.append((-q, index, tag.strip()))
    return [tag for _, _, tag in sorted(tags)]


@dataclass(frozen=True)
class Lang:
    code: str  # fr, en, ar
    locale: Locale  # for dates and numbers

    @property
    def dir(self) -> str:
        return "rtl" if self.code in RTL else "ltr"

    def t(self, key: str, **values: object) -> str:
        """The string `key` in this language (English when missing, the key itself when unknown)."""
        text = MESSAGES[self.code].get(key) or MESSAGES[DEFAULT].get(key) or key
        return text.format(**values) if values else text

    def date(self, value: dt.date | dt.datetime | None) -> str:
        if value is None:
            return "—"
        if isinstance(value, dt.datetime):
            return format_date(value.date(), format="medium", locale=self.locale)
        return format_date(value, format="medium", locale=self.locale)

    def datetime(self, value: dt.datetime | None) -> str:
        if value is None:
            return "—"
        return format_datetime(value, format="medium", tzinfo=value.tzinfo, locale=self.locale)

    def number(self, value: int | float | Decimal | None) -> str:
        if value is None:
            return "—"
        return format_decimal(value, locale=self.locale)

    def month(self, value: dt.date | dt.datetime) -> str:
        """ "December 2026", "décembre 2026", "ديسمبر 2026"."""
        day = value.date() if isinstance(value, dt.datetime) else value
        return format_skeleton("yMMMM", day, locale=self.locale)

    def bytes(self, value: int | None) -> str:
        """A size in the largest unit that keeps it at 1 or more (kB, MB, GB: powers of 1000)."""
        if value is None:
            return "—"
        amount, unit = float(value), "byte"
        for bigger in ("kilobyte", "megabyte", "gigabyte", "terabyte"):
            if amount < 1000:
                break
            amount, unit = amount / 1000, bigger
        return format_unit(round(amount, 1), f"digital-{unit}", length="short", locale=self.locale)

    def percent(self, value: float) -> str:
        return format_percent(value, locale=self.locale)


def _locale(tag: str) -> Locale | None:
    try:
        return Locale.parse(tag.replace("-", "_"))
    except (ValueError, UnknownLocaleError):
        return None


def lang(code: str, accept_language: str | None = None) -> Lang:
    """`code`, formatted in the first accepted locale of that language (fr-CH, ar-DZ ...)."""
    for tag in _accepted(accept_language):
        if tag.split("-")[0].lower() == code and (found := _locale(tag)) is not None:
            return Lang(code, found)
    return Lang(code, Locale.parse(code))


def negotiate(cookie: str | None, accept_language: str | None) -> Lang:
    if cookie in LANGUAGES:
        return lang(cookie, accept_language)
    for tag in _accepted(accept_language):
        primary = tag.split("-")[0].lower()
        if primary in LANGUAGES:
            return lang(primary, accept_language)
    return lang(DEFAULT, accept_language)
