"""Files in the knowledge base: checked, stored with the document made from them, listed, read back.

The same code serves `POST /knowledge-base/files` and `iafactory knowledge import`. A file is
checked before anything is stored (`inspect`): its type is read from the content (extraction.detect),
and must agree with what the client called it (the part's Content-Type, the name's extension) when
it said anything specific; a zip bomb in a DOCX and an encrypted PDF are refused there too, since
the zip directory and the PDF trailer are cheap to read. What only a full read can tell (a PDF
with no text layer, a damaged page) is found by the worker, which marks the document `failed` with
the reason. The original is kept in knowledge_files (the tenant's database, hence its region),
counted in the plan's storage limit (max_kb_bytes) by the database.

The largest file a tenant may send is its plan's max_file_bytes (or its own override), within the
platform's ceiling (the kb_max_file_bytes setting, which the body-size middleware enforces before
the tenant is known): `file_limit` reads which of the two is in force, `inspect` refuses above it.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote
from uuid import UUID

from iafactory.db.scope import Transaction
from iafactory.knowledge import extraction
from iafactory.knowledge.schemas import JOBS_CHANNEL, KNOWLEDGE_BASE
from iafactory.resources import repository


class FileRefused(Exception):
    """The file is refused before anything is stored: `status` (413, 415, 422) and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class FileLimit:
    """The largest file accepted, in bytes, and which limit that is (said in the refusal)."""

    max_bytes: int
    which: str


async def file_limit(tx: Transaction, tenant_id: UUID, ceiling: int) -> FileLimit:
    """The file-size limit in force for a tenant: its max_file_bytes (the plan's, or the tenant's
    override: app.tenant_limits), or the platform's ceiling when that is smaller."""
    row = await tx.fetchrow("SELECT plan, max_file_bytes FROM app.tenant_limits(%s)", (tenant_id,))
    if row is None or int(row["max_file_bytes"]) > ceiling:  # the column is NOT NULL, the override too
        return FileLimit(ceiling, "the platform's limit (kb_max_file_bytes)")
    return FileLimit(int(row["max_file_bytes"]), f"the tenant's max_file_bytes (plan {row['plan']})")


def _declared_family(declared_type: str | None, filename: str | None) -> tuple[str | None, str | None]:
    """(family, exact type) the client claimed through the part's Content-Type, else the name's
    extension; (None, None) when it claimed nothing specific."""
    media = (declared_type or "").split(";", 1)[0].strip().lower()
    if media and media not in extraction.GENERIC_TYPES:
        if media in extraction.DECLARED_FAMILY:
            exact = media if media in extraction.MEDIA_TYPES else None
            if media == "text/x-markdown":
                exact = extraction.MARKDOWN
            return extraction.DECLARED_FAMILY[media], exact
        if media.startswith("text/"):
            return "text", None
        return media, None  # a type we do not take: the content must then be that too
    suffix = "." + filename.rsplit(".", 1)[-1].lower() if filename and "." in filename else ""
    if suffix in extraction.EXTENSIONS:
        exact = extraction.EXTENSIONS[suffix]
        return _family(exact), exact
    return None, None


def _family(media_type: str) -> str:
    """PDF, DOCX, or text (HTML, Markdown and plain text: all decoded text)."""
    return "text" if media_type in (extraction.HTML, extraction.MARKDOWN, extraction.TEXT) else media_type


def inspect(data: bytes, filename: str | None, declared_type: str | None, limit: FileLimit) -> str:
    """The media type to store `data` as, or FileRefused. CPU work (a PDF's trailer is parsed):
    a request runs it in a thread."""
    if not data:
        raise FileRefused(422, "the file is empty (0 bytes)")
    if len(data) > limit.max_bytes:
        raise FileRefused(
            413, f"the file has {len(data)} bytes, more than the {limit.max_bytes} allowed by {limit.which}"
        )
    try:
        detected = extraction.detect(data, filename)
    except extraction.UnsupportedType as err:
        raise FileRefused(
            415, f"{err}; accepted: PDF, Word (DOCX), HTML, Markdown and plain text (UTF-8 or Windows-1252)"
        ) from err
    family, exact = _declared_family(declared_type, filename)
    if family is not None and family != _family(detected):
        said = (declared_type or "").split(";", 1)[0].strip() or filename
        raise FileRefused(415, f"the file is declared as {said!r} but its content is {detected}")
    if family == "text" and exact is not None:
        detected = exact  # HTML, Markdown or plain text: the same bytes, read as the client says
    try:
        extraction.check(data, detected)
    except extraction.ExtractionError as err:
        raise FileRefused(422, str(err)) from err
    return detected


_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")


def clean_filename(filename: str | None) -> str:
    """The name without any directory part or control character, at most 255 characters."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE.sub("", unicodedata.normalize("NFC", name)).strip().strip(".") or "file"
    if len(name) > 255:
        stem, dot, ext = name.rpartition(".")
        name = (stem[: 255 - len(ext) - 1] + dot + ext) if dot and len(ext) < 20 else name[:255]
    return name


def content_disposition(filename: str) -> str:
    """`attachment` (never rendered inline: an uploaded HTML page must not run in our origin), with
    an ASCII fallback name and the exact one in RFC 5987 form."""
    ascii_name = re.sub(r"[^A-Za-z0-9._ -]", "_", filename)[:150] or "file"
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename, safe='')}"


FILE_COLUMNS = """f.id, f.document_id, f.filename, f.media_type, f.size_bytes, f.sha256, f.created_at,
                  d.index_status, d.index_error"""


async def store(
    tx: Transaction,
    tenant_id: UUID,
    *,
    filename: str,
    media_type: str,
    data: bytes,
    title: str | None = None,
    source: str | None = None,
    language: str | None = None,
) -> dict[str, Any]:
    """The document (queued for indexing by the database) and its file; returns the file with its
    document. The plan's storage limit is checked by the database (403, limit max_kb_bytes)."""
    name = clean_filename(filename)
    document = await repository.insert(
        tx,
        KNOWLEDGE_BASE,
        tenant_id,
        {"title": (title or name)[:500], "content": "", "source": source, "language": language, "metadata": {}},
    )
    row = await tx.fetchrow(
        """INSERT INTO knowledge_files (tenant_id, document_id, filename, media_type, size_bytes, sha256, content)
           VALUES (%s, %s, %s, %s, %s, %s, %s)
           RETURNING id, document_id, filename, media_type, size_bytes, sha256, created_at""",
        (tenant_id, document["id"], name, media_type, len(data), hashlib.sha256(data).hexdigest(), data),
    )
    assert row is not None  # INSERT ... RETURNING of one row
    # From the request's own session (see resources.router: the trigger's NOTIFY may run elsewhere).
    await tx.execute("SELECT pg_notify(%s, '')", (JOBS_CHANNEL,))
    return {
        **row,
        "index_status": document["index_status"],
        "index_error": document["index_error"],
        "document": document,
    }


async def get(tx: Transaction, tenant_id: UUID, file_id: int) -> dict[str, Any] | None:
    """The file's record and its bytes (`content`)."""
    return await tx.fetchrow(
        f"""SELECT {FILE_COLUMNS}, f.content FROM knowledge_files f
            JOIN knowledge_base d ON d.tenant_id = f.tenant_id AND d.id = f.document_id
            WHERE f.tenant_id = %s AND f.id = %s""",
        (tenant_id, file_id),
    )


async def page(tx: Transaction, tenant_id: UUID, limit: int, after: tuple[Any, int] | None) -> list[dict[str, Any]]:
    """Newest first, limit + 1 rows (pagination.page_of), without the bytes."""
    keyset = "AND (f.created_at, f.id) < (%s, %s)" if after else ""
    return await tx.fetch(
        f"""SELECT {FILE_COLUMNS} FROM knowledge_files f
            JOIN knowledge_base d ON d.tenant_id = f.tenant_id AND d.id = f.document_id
            WHERE f.tenant_id = %s {keyset}
            ORDER BY f.created_at DESC, f.id DESC LIMIT %s""",
        (tenant_id, *(after or ()), limit + 1),
    )
