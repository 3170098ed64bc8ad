"""Language detection and accent folding, the same for documents and queries.

The embedded PostgreSQL has no `unaccent`, so folding happens here: Latin accents are stripped
(é → e, ß stays ß, lowercase), Arabic diacritics (harakat, shadda, sukun, superscript alef) and the
tatweel are removed, and alef variants are unified. Documents and queries pass through the same
function, so "Genève" finds "geneve" and "مَدْرَسَة" finds "مدرسة".
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

# Languages with a PostgreSQL text-search configuration in every supported server.
TS_CONFIGS = {"fr": "french", "de": "german", "en": "english", "ar": "arabic"}
MIN_CONFIDENCE = 0.80
MIN_LETTERS = 12

_ARABIC_MARKS = re.compile("[\u0610-\u061a\u064b-\u065f\u0670\u06d6-\u06ed\u0640]")
_ALEF_VARIANTS = str.maketrans({"\u0622": "\u0627", "\u0623": "\u0627", "\u0625": "\u0627", "\u0671": "\u0627"})


def fold(text: str) -> str:
    text = _ARABIC_MARKS.sub("", text).translate(_ALEF_VARIANTS)
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch) or _is_arabic(ch))
    return unicodedata.normalize("NFKC", stripped).casefold()


def _is_arabic(ch: str) -> bool:
    return "\u0600" <= ch <= "\u06ff"


@lru_cache(maxsize=1)
def _identifier():  # py3langid's LanguageIdentifier
    from py3langid.langid import MODEL_DIR, MODEL_FILE, LanguageIdentifier

    identifier = LanguageIdentifier.from_model_file(MODEL_DIR / MODEL_FILE, norm_probs=True)
    identifier.set_languages(sorted(TS_CONFIGS))
    return identifier


def detect_language(text: str) -> str | None:
    """'fr', 'de', 'en' or 'ar' when confident (offline model shipped in py3langid); else None."""
    letters = sum(ch.isalpha() for ch in text[:2000])
    if letters < MIN_LETTERS:
        return None
    language, confidence = _identifier().classify(text[:2000])
    return language if confidence >= MIN_CONFIDENCE else None


def ts_config(language: str | None) -> str:
    """The PostgreSQL text-search configuration for a language ('fr', or a regional 'fr-CH');
    'simple' when unknown."""
    return TS_CONFIGS.get((language or "").split("-", 1)[0].lower(), "simple")
