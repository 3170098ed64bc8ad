"""Files → text: the type read from the content, then sections (a page of a PDF; the whole text,
headings as Markdown `#` lines, for the others), produced one at a time.

Libraries, chosen for being pure Python (no system package, nothing downloaded at run time),
maintained, and lazy where it matters:

* PDF: `pypdf`. Reads the cross-reference table first and parses a page's objects only when the
  page is read, so a 1,000-page PDF is extracted page by page (bench/extraction.py measures it).
  pdfminer.six extracts layout a little better but is several times slower and heavier; OCR of
  scanned pages is out of scope: a PDF with no text layer is reported as such.
* DOCX: `python-docx` (paragraph styles "Heading N" become the heading path; tables are read row
  by row). The package is a zip: its directory is checked before anything is inflated (see
  `check_docx`), so a zip bomb is refused without being opened.
* HTML: BeautifulSoup over `lxml` (tolerant of broken markup, fast). Headings h1-h6 are kept as
  Markdown headings; scripts, styles and other non-content elements are dropped.
* Markdown and text: decoded (UTF-8, UTF-16 with a BOM, else Windows-1252), already in the form
  the chunker reads (`#` headings).

Every failure a file can cause raises `ExtractionError` with a sentence for the document's
`index_error`: the worker records it and goes on.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

PDF = "application/pdf"
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
HTML = "text/html"
MARKDOWN = "text/markdown"
TEXT = "text/plain"
MEDIA_TYPES = (PDF, DOCX, HTML, MARKDOWN, TEXT)
EXTENSIONS = {
    ".pdf": PDF,
    ".docx": DOCX,
    ".html": HTML,
    ".htm": HTML,
    ".md": MARKDOWN,
    ".markdown": MARKDOWN,
    ".txt": TEXT,
    ".text": TEXT,
}
# What a client may call each type (Content-Type of the part); generic types say nothing.
DECLARED_FAMILY = {
    PDF: PDF,
    "application/x-pdf": PDF,
    DOCX: DOCX,
    HTML: HTML,
    "application/xhtml+xml": HTML,
    MARKDOWN: "text",
    "text/x-markdown": "text",
    TEXT: "text",
}
GENERIC_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream", "application/unknown"})

# A DOCX's parts, inflated, may not exceed these (checked in the zip directory before reading).
DOCX_MAX_UNCOMPRESSED = 256 * 1024 * 1024
DOCX_MAX_RATIO = 100  # for a part of more than DOCX_RATIO_FLOOR bytes
DOCX_RATIO_FLOOR = 1024 * 1024
DOCX_MAX_PARTS = 10_000


class ExtractionError(Exception):
    """The file cannot be read as text; the message says why, for a person."""


class UnsupportedType(ExtractionError):
    pass


@dataclass(frozen=True)
class Section:
    """Text of one page (`page`, from 1) or of a whole unpaged file (`page` None). Headings are
    Markdown `#` lines, which the chunker turns into heading paths."""

    text: str
    page: int | None = None


def family(media_type: str) -> str:
    return "text" if media_type in (MARKDOWN, TEXT) else media_type


def detect(data: bytes, filename: str | None = None) -> str:
    """The media type of `data`, read from the content: PDF by its header, DOCX by its zip
    structure (a `word/document.xml` part), HTML by its markup, text by decoding. The file name
    only tells Markdown from plain text (the same bytes either way). UnsupportedType otherwise."""
    head = data[:1024]
    if b"%PDF-" in head:
        return PDF
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                names = set(archive.namelist())
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            raise UnsupportedType(f"a damaged zip archive ({err})") from err
        if "word/document.xml" in names and "[Content_Types].xml" in names:
            return DOCX
        raise UnsupportedType("a zip archive that is not a Word document (DOCX)")
    if data[:8] == b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1":
        raise UnsupportedType("a legacy Office file (.doc) or an encrypted Office document: save it as DOCX or PDF")
    text = decode(data)  # UnsupportedType for binary content
    sample = text[:4096].lstrip().lower()
    if sample.startswith(("<!doctype html", "<html")) or re.search(r"<(html|head|body)[\s>]", sample):
        return HTML
    suffix = "." + filename.rsplit(".", 1)[-1].lower() if filename and "." in filename else ""
    return MARKDOWN if EXTENSIONS.get(suffix) == MARKDOWN else TEXT


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")


def decode(data: bytes) -> str:
    """Text from bytes: UTF-8 (BOM or not), UTF-16 with a BOM, else Windows-1252. Bytes with
    control characters (NUL ...) are binary, not text."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError as err:
            raise UnsupportedType("not valid UTF-16 text") from err
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            try:
                text = data.decode("cp1252")
            except UnicodeDecodeError as err:
                raise UnsupportedType("binary content of a type that is not supported") from err
    if _CONTROL.search(text[:65536]):
        raise UnsupportedType("binary content of a type that is not supported")
    return text


def check_docx(data: bytes) -> None:
    """Refuse a zip bomb from the archive's directory alone (nothing is inflated): too many
    parts, too much once inflated, or a part that inflates more than DOCX_MAX_RATIO times."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            parts = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise ExtractionError(f"a damaged Word document ({err})") from err
    if len(parts) > DOCX_MAX_PARTS:
        raise ExtractionError(f"a Word document with {len(parts)} parts (at most {DOCX_MAX_PARTS}): refused")
    total = 0
    for part in parts:
        total += part.file_size
        if part.file_size > DOCX_RATIO_FLOOR and part.file_size > DOCX_MAX_RATIO * max(part.compress_size, 1):
            raise ExtractionError(
                f"a Word document whose part {part.filename!r} inflates {part.file_size // max(part.compress_size, 1)}"
                f" times (at most {DOCX_MAX_RATIO}): a zip bomb, refused"
            )
    if total > DOCX_MAX_UNCOMPRESSED:
        raise ExtractionError(
            f"a Word document of {total} bytes once inflated (at most {DOCX_MAX_UNCOMPRESSED}): refused"
        )


def _pdf_reader(data: bytes):  # a pypdf PdfReader, readable (decrypted when it opens with no password)
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            # Many PDFs are encrypted with an empty password (restrictions only): those open.
            try:
                opened = reader.decrypt("")
            except Exception as err:
                raise ExtractionError(f"an encrypted PDF ({type(err).__name__}: {err}): upload it unprotected") from err
            if not opened:
                raise ExtractionError("an encrypted PDF that needs a password: upload it unprotected")
        return reader
    except ExtractionError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
        raise ExtractionError(f"a damaged PDF ({type(err).__name__}: {err})") from err


def check(data: bytes, media_type: str) -> None:
    """The checks cheap enough for the upload itself (the directory of a DOCX, the header and
    encryption of a PDF): a file that fails them is refused before anything is stored."""
    if media_type == DOCX:
        check_docx(data)
    elif media_type == PDF:
        _pdf_reader(data)


def sections(data: bytes, media_type: str) -> Iterator[Section]:
    """The file's text, a section at a time (a PDF's pages one by one)."""
    if media_type == PDF:
        yield from _pdf_pages(data)
    elif media_type == DOCX:
        yield Section(_docx_text(data))
    elif media_type == HTML:
        yield Section(html_text(decode(data)))
    elif media_type in (MARKDOWN, TEXT):
        yield Section(decode(data))
    else:
        raise UnsupportedType(f"no extraction for {media_type}")


def _pdf_pages(data: bytes) -> Iterator[Section]:
    reader = _pdf_reader(data)
    try:
        count = len(reader.pages)
    except Exception as err:
        raise ExtractionError(f"a damaged PDF ({type(err).__name__}: {err})") from err
    for number in range(count):
        try:
            text = reader.pages[number].extract_text() or ""
        except Exception as err:
            raise ExtractionError(f"page {number + 1} of the PDF cannot be read ({type(err).__name__}: {err})") from err
        # pypdf keeps every object it has parsed (content streams, fonts) for the reader's life: let
        # each page's go, so that memory does not grow with the number of pages (bench/extraction.py).
        cache = getattr(reader, "resolved_objects", None)
        if isinstance(cache, dict):
            cache.clear()
        yield Section(_tidy(text), number + 1)


def _docx_text(data: bytes) -> str:
    check_docx(data)
    import docx
    from docx.oxml.ns import qn
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    try:
        document = docx.Document(io.BytesIO(data))
    except Exception as err:
        raise ExtractionError(f"a damaged Word document ({type(err).__name__}: {err})") from err
    lines: list[str] = []
    body = document.element.body
    for element in body.iterchildren():
        if element.tag == qn("w:p"):
            paragraph = Paragraph(element, document)
            text = paragraph.text.strip()
            if not text:
                continue
            style = (paragraph.style.name if paragraph.style is not None else "") or ""
            level = _heading_level(style)
            lines.append(f"{'#' * level} {text}" if level else text)
        elif element.tag == qn("w:tbl"):
            table = Table(element, document)
            for row in table.rows:
                cells = [cell.text.strip() for cell in row.cells]
                if any(cells):
                    lines.append(" | ".join(cells))
    return "\n\n".join(lines)


def _heading_level(style: str) -> int:
    if style == "Title":
        return 1
    m = re.fullmatch(r"Heading (\d)", style)
    return min(int(m.group(1)), 6) if m else 0


_DROPPED = ("script", "style", "noscript", "template", "svg", "head", "nav", "footer", "form", "iframe")
_BLOCKS = frozenset(
    [
        "p",
        "div",
        "section",
        "article",
        "main",
        "aside",
        "header",
        "li",
        "ul",
        "ol",
        "dl",
        "dt",
        "dd",
        "table",
        "tr",
        "blockquote",
        "pre",
        "figure",
        "figcaption",
        "address",
        "br",
        "hr",
        "td",
        "th",
    ]
)


def html_text(markup: str) -> str:
    """Text of an HTML page with its headings as Markdown headings and blocks as paragraphs."""
    from bs4 import BeautifulSoup, NavigableString, Tag

    soup = BeautifulSoup(markup, "lxml")
    for tag in soup.find_all(_DROPPED):
        tag.decompose()
    parts: list[str] = []

    def walk(node: Tag) -> None:
        for child in node.children:
            if isinstance(child, NavigableString):
                if type(child) is NavigableString:  # not comments, CDATA, doctypes
                    parts.append(str(child))
            elif isinstance(child, Tag):
                name = child.name.lower()
                if re.fullmatch(r"h[1-6]", name):
                    title = " ".join(child.get_text(" ").split())
                    if title:
                        parts.append(f"\n\n{'#' * int(name[1])} {title}\n\n")
                elif name in _BLOCKS:
                    parts.append("\n\n")
                    walk(child)
                    parts.append("\n\n")
                else:
                    walk(child)

    walk(soup.body or soup)
    return _tidy("".join(parts))


def _tidy(text: str) -> str:
    """Spaces collapsed within lines, at most one blank line between paragraphs."""
    lines = [" ".join(line.split()) for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
