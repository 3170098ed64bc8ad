"""Files in the knowledge base (030, knowledge/files.py, extraction.py): upload, index from the
file, cite pages, download; bad input refused or recorded as `failed`; limits; tenant export,
import and erase with a file; the CLI import of a folder.

PDFs are made with fpdf2 and DOCX with python-docx inside the tests; the worker is driven with
`worker.drain` (never waited for)."""

from __future__ import annotations

import io
import tarfile
import uuid
import zipfile
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from api_support import ApiWorld, app_client
from conftest import run_cli
from iafactory.knowledge import extraction, worker
from iafactory.knowledge.chunking import chunk_sections
from iafactory.knowledge.embeddings import embedder
from iafactory.knowledge.files import FileLimit, FileRefused, clean_filename, content_disposition, inspect

pytestmark = pytest.mark.anyio

FILES = "/api/v1/knowledge-base/files"
SEARCH = "/api/v1/knowledge-base/search"
MIB = 1_048_576
ROOMY = FileLimit(10**6, "a test's limit")


def big_text(size: int) -> bytes:
    """Plain text of exactly `size` bytes, made in memory."""
    line = b"The quarterly report of the cooperative, paragraph after paragraph.\n"
    return (line * (size // len(line) + 1))[:size]


# --- Files made here ---------------------------------------------------------------------------------


def make_pdf(pages: list[str]) -> bytes:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("Helvetica", size=11)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 6, text)
    return bytes(pdf.output())


def image_only_pdf() -> bytes:
    """Two pages of drawings and no text at all: what a scan looks like to a text extractor."""
    from fpdf import FPDF

    pdf = FPDF()
    for _ in range(2):
        pdf.add_page()
        pdf.set_fill_color(40, 40, 40)
        for i in range(20):
            pdf.rect(10 + i * 8, 20 + i * 5, 6, 30, style="F")
    return bytes(pdf.output())


def encrypted_pdf() -> bytes:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter()
    for page in PdfReader(io.BytesIO(make_pdf(["Confidential minutes of the board."]))).pages:
        writer.add_page(page)
    writer.encrypt(user_password="secret", owner_password="owner", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def make_docx(parts: list[tuple[int, str]]) -> bytes:
    """(0, paragraph) or (level, heading)."""
    import docx

    document = docx.Document()
    for level, text in parts:
        if level:
            document.add_heading(text, level=level)
        else:
            document.add_paragraph(text)
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def zip_bomb_docx() -> bytes:
    """A valid DOCX plus a part that inflates a thousand times (8 MiB of zeros)."""
    base = io.BytesIO(make_docx([(1, "Harmless"), (0, "Nothing to see.")]))
    out = io.BytesIO()
    with zipfile.ZipFile(base) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            dst.writestr(item, src.read(item.filename))
        dst.writestr("word/media/padding.bin", bytes(8 * 1024 * 1024))
    return out.getvalue()


HTML_PAGE = b"""<!DOCTYPE html><html><head><title>t</title><script>var secret = 'nope';</script></head>
<body><nav>menu</nav><h1>Handbook</h1><h2>Holidays</h2><p>Employees take the
<b>quarzolith</b> day off each spring.</p><h2>Other</h2><p>Nothing else.</p></body></html>"""
MARKDOWN = b"# Garden\n\n## Watering\n\nThe ferns want rain water, the velmorite says.\n"


# --- Helpers -----------------------------------------------------------------------------------------


def app_db(world: ApiWorld) -> Any:
    return world.client._transport.app.state.db  # type: ignore[attr-defined]


async def admin_rows(world: ApiWorld, query: str, params: Any = ()) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(world.admin_url, autocommit=True, row_factory=dict_row) as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall() if cur.description else []


async def upload(
    world: ApiWorld,
    name: str,
    data: bytes,
    content_type: str = "application/octet-stream",
    *,
    role: str = "member",
    **form: str,
) -> Any:
    return await world.client.post(
        FILES, files={"file": (name, data, content_type)}, data=form, headers=world.a.auth(role)
    )


async def uploaded(world: ApiWorld, name: str, data: bytes, content_type: str = "application/octet-stream") -> Any:
    r = await upload(world, name, data, content_type)
    assert r.status_code == 201, r.text
    return r.json()


async def index(world: ApiWorld) -> None:
    await worker.drain(app_db(world), embedder(world.settings))


async def document(world: ApiWorld, document_id: int) -> dict[str, Any]:
    r = await world.client.get(f"/api/v1/knowledge-base/{document_id}", headers=world.a.auth("viewer"))
    assert r.status_code == 200, r.text
    return r.json()


async def search(world: ApiWorld, query: str, mode: str = "keyword", headers: Any = None) -> list[dict[str, Any]]:
    r = await world.client.post(
        SEARCH, json={"query": query, "mode": mode, "k": 5}, headers=headers or world.a.auth("viewer")
    )
    assert r.status_code == 200, r.text
    return r.json()["passages"]


def field_of(r: Any) -> list[str]:
    assert r.headers["content-type"].startswith("application/problem+json"), r.text
    return [e["field"] for e in r.json().get("errors", [])]


# --- Each type in, indexed, found, cited, downloaded ------------------------------------------------


async def test_a_pdf_is_indexed_page_by_page_and_passages_cite_their_page(module_api_world: ApiWorld) -> None:
    w = module_api_world
    pages = [f"Page {n} of the annual report. Revenue grew in every canton." for n in range(1, 6)]
    pages[2] = "The auditors found the glimmerfax procedure sound and recommended it to the board."
    data = make_pdf(pages)
    body = await uploaded(w, "report.pdf", data)
    assert body["media_type"] == "application/pdf" and body["size_bytes"] == len(data)
    assert body["document"]["index_status"] == "pending" and body["document"]["title"] == "report.pdf"
    await index(w)
    doc = await document(w, body["document_id"])
    assert doc["index_status"] == "indexed", doc
    passages = [p for p in await search(w, "glimmerfax auditors") if p["document_id"] == body["document_id"]]
    assert passages and passages[0]["page"] == 3 and passages[0]["page_end"] in (3, 4)
    assert "glimmerfax" in passages[0]["text"]
    # Download: the same bytes, the stored type, an attachment, no sniffing.
    r = await w.client.get(f"{FILES}/{body['id']}", headers=w.a.auth("viewer"))
    assert r.status_code == 200 and r.content == data
    assert r.headers["content-type"] == "application/pdf"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["content-disposition"].startswith('attachment; filename="report.pdf"')
    # Listed, with the document's status.
    r = await w.client.get(FILES, headers=w.a.auth("viewer"), params={"limit": 100})
    listed = {f["id"]: f for f in r.json()["items"]}
    assert listed[body["id"]]["index_status"] == "indexed" and "content" not in listed[body["id"]]


async def test_docx_html_markdown_and_text_are_indexed_with_their_headings(module_api_world: ApiWorld) -> None:
    w = module_api_world
    docx_data = make_docx([(1, "Procedures"), (2, "Fire drill"), (0, "Meet at the trovanite assembly point.")])
    cases = [
        ("drill.docx", docx_data, "trovanite", "Procedures > Fire drill", extraction.DOCX),
        ("handbook.html", HTML_PAGE, "quarzolith", "Handbook > Holidays", extraction.HTML),
        ("garden.md", MARKDOWN, "velmorite", "Garden > Watering", extraction.MARKDOWN),
        ("note.txt", "Le comité valide le budget zephyrine.".encode(), "zephyrine", "", extraction.TEXT),
    ]
    made = [(await uploaded(w, name, data), word, path, media) for name, data, word, path, media in cases]
    await index(w)
    for body, word, path, media in made:
        assert body["media_type"] == media
        assert (await document(w, body["document_id"]))["index_status"] == "indexed"
        [passage] = [p for p in await search(w, word) if p["document_id"] == body["document_id"]]
        assert passage["heading_path"] == path and passage["page"] is None
    # The script of the HTML page is not text of the document.
    assert not [p for p in await search(w, "secret nope") if p["document_id"] == made[1][0]["document_id"]]


async def test_a_pdf_reindexed_after_a_crash_has_no_duplicate_chunks(module_api_world: ApiWorld) -> None:
    """The worker died after writing some batches: the rerun rewrites them by number."""
    w = module_api_world
    body = await uploaded(w, "long.pdf", make_pdf([f"Section {n}. " + "words of filler text " * 120 for n in range(8)]))
    await index(w)
    before = await admin_rows(
        w,
        "SELECT chunk_no, content_hash FROM knowledge_chunks WHERE tenant_id = %s AND document_id = %s "
        "ORDER BY chunk_no",
        (w.a.id, body["document_id"]),
    )
    assert len(before) > 8
    # As if a previous run had stopped half-way through a longer version, then the job ran again.
    await admin_rows(
        w,
        "UPDATE knowledge_chunks SET content = 'stale' WHERE tenant_id = %s AND document_id = %s AND chunk_no < 3",
        (w.a.id, body["document_id"]),
    )
    await admin_rows(
        w, "INSERT INTO knowledge_jobs (tenant_id, document_id) VALUES (%s, %s)", (w.a.id, body["document_id"])
    )
    await index(w)
    after = await admin_rows(
        w,
        "SELECT chunk_no, content_hash, content FROM knowledge_chunks WHERE tenant_id = %s AND document_id = %s "
        "ORDER BY chunk_no",
        (w.a.id, body["document_id"]),
    )
    assert [(r["chunk_no"], r["content_hash"]) for r in after] == [(r["chunk_no"], r["content_hash"]) for r in before]
    assert all(r["content"] != "stale" for r in after)


# --- Bad input ---------------------------------------------------------------------------------------


async def test_a_file_that_lies_about_its_type_is_refused_naming_the_field(module_api_world: ApiWorld) -> None:
    w = module_api_world
    png = b"\x89PNG\r\n\x1a\n" + bytes(64)
    for name, data, ctype in [
        ("report.pdf", b"just some text, not a PDF", "application/pdf"),  # declared PDF, is text
        ("report.pdf", png, "application/octet-stream"),  # named PDF, is an image
        ("notes.txt", make_pdf(["hello"]), "text/plain"),  # declared text, is a PDF
        ("photo.png", png, "image/png"),  # an image, said honestly: not a type we take
        ("archive.zip", zip_of({"a.txt": b"x"}), "application/zip"),
    ]:
        r = await upload(w, name, data, ctype)
        assert r.status_code == 415, (name, r.text)
        assert field_of(r) == ["file"]
    assert not await admin_rows(w, "SELECT 1 FROM knowledge_files WHERE filename = 'photo.png'")


def zip_of(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return out.getvalue()


async def test_empty_file_zip_bomb_and_encrypted_pdf_are_refused_before_anything_is_stored(
    module_api_world: ApiWorld,
) -> None:
    w = module_api_world
    files_before = len(await admin_rows(w, "SELECT 1 FROM knowledge_files WHERE tenant_id = %s", (w.a.id,)))
    r = await upload(w, "empty.txt", b"")
    assert r.status_code == 422 and field_of(r) == ["file"] and "empty" in r.json()["detail"]
    r = await upload(w, "bomb.docx", zip_bomb_docx())
    assert r.status_code == 422 and field_of(r) == ["file"] and "zip bomb" in r.json()["detail"]
    r = await upload(w, "locked.pdf", encrypted_pdf())
    assert r.status_code == 422 and field_of(r) == ["file"] and "encrypted" in r.json()["detail"]
    r = await upload(w, "broken.pdf", b"%PDF-1.7\n garbage with no cross-reference table")
    assert r.status_code == 422 and field_of(r) == ["file"]
    assert len(await admin_rows(w, "SELECT 1 FROM knowledge_files WHERE tenant_id = %s", (w.a.id,))) == files_before


async def test_a_pdf_without_text_layer_is_failed_with_a_clear_error_and_the_worker_goes_on(
    module_api_world: ApiWorld,
) -> None:
    w = module_api_world
    scanned = image_only_pdf()
    scan = await uploaded(w, "scan.pdf", scanned)
    fine = await uploaded(w, "fine.md", b"# Fine\n\nThe worker carries on after a bad file.")
    await index(w)
    doc = await document(w, scan["document_id"])
    assert doc["index_status"] == "failed"
    assert "no text" in doc["index_error"] and "OCR" in doc["index_error"]
    assert (await document(w, fine["document_id"]))["index_status"] == "indexed"
    jobs = await admin_rows(
        w,
        "SELECT status, attempts FROM knowledge_jobs WHERE tenant_id = %s AND document_id = %s",
        (w.a.id, scan["document_id"]),
    )
    assert [(j["status"], j["attempts"]) for j in jobs] == [("done", 1)]  # recorded once, not retried
    # The original stays downloadable.
    r = await w.client.get(f"{FILES}/{scan['id']}", headers=w.a.auth("viewer"))
    assert r.status_code == 200 and r.content == scanned


async def test_a_damaged_file_found_only_by_the_worker_is_failed_not_a_crash(module_api_world: ApiWorld) -> None:
    """Bytes changed after the checks (e.g. an import of an old archive): the worker records why."""
    w = module_api_world
    body = await uploaded(w, "tiny.pdf", make_pdf(["fine at upload"]))
    await admin_rows(
        w,
        "UPDATE knowledge_files SET content = %s WHERE tenant_id = %s AND id = %s",
        (
            b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF",
            w.a.id,
            body["id"],
        ),
    )
    await index(w)
    doc = await document(w, body["document_id"])
    assert doc["index_status"] == "failed" and doc["index_error"]


async def test_too_large_is_413_naming_the_field(module_api_world: ApiWorld) -> None:
    w = module_api_world
    async with app_client(w.admin_url, kb_max_file_bytes=2000) as (client, _, _):
        r = await client.post(FILES, files={"file": ("big.txt", b"x " * 1500, "text/plain")}, headers=w.a.auth())
        assert r.status_code == 413 and field_of(r) == ["file"], r.text
        # The platform's ceiling (2000) is below the tenant's max_file_bytes: it is the one in force.
        assert "more than the 2000 allowed by the platform's limit (kb_max_file_bytes)" in r.json()["detail"], r.text
        # Far over: the body is refused as it arrives, before the application reads it.
        r = await client.post(FILES, files={"file": ("huge.txt", b"x " * 100_000, "text/plain")}, headers=w.a.auth())
        assert r.status_code == 413 and field_of(r) == ["file"], r.text


async def test_the_plan_storage_limit_counts_files(module_api_world: ApiWorld) -> None:
    w = module_api_world
    used = (
        await admin_rows(
            w,
            """SELECT (SELECT coalesce(sum(octet_length(content)), 0) FROM knowledge_base WHERE tenant_id = %s)
                    + (SELECT coalesce(sum(size_bytes), 0) FROM knowledge_files WHERE tenant_id = %s) AS used""",
            (w.a.id, w.a.id),
        )
    )[0]["used"]
    r = await w.client.patch(
        f"/api/v1/admin/tenants/{w.a.id}",
        json={"limits": {"max_kb_bytes": int(used) + 1000}},
        headers=w.headers(w.platform_token),
    )
    assert r.status_code == 200, r.text
    try:
        assert (await upload(w, "small.txt", b"a" * 900)).status_code == 201
        r = await upload(w, "over.txt", b"b" * 200)
        assert r.status_code == 403 and r.json()["limit"] == "max_kb_bytes", r.text
        # The text of documents and the files share the limit.
        r = await w.client.post(
            "/api/v1/knowledge-base", json={"title": "t", "content": "c" * 200}, headers=w.a.auth("member")
        )
        assert r.status_code == 403 and r.json()["limit"] == "max_kb_bytes", r.text
    finally:
        r = await w.client.patch(
            f"/api/v1/admin/tenants/{w.a.id}", json={"limits": {}}, headers=w.headers(w.platform_token)
        )
        assert r.status_code == 200, r.text


async def admin_patch(world: ApiWorld, body: dict[str, Any]) -> None:
    r = await world.client.patch(
        f"/api/v1/admin/tenants/{world.a.id}", json=body, headers=world.headers(world.platform_token)
    )
    assert r.status_code == 200, r.text


async def stored_titled(world: ApiWorld, title: str) -> int:
    rows = await admin_rows(
        world,
        """SELECT (SELECT count(*) FROM knowledge_base WHERE tenant_id = %s AND title = %s)
                + (SELECT count(*) FROM knowledge_files WHERE tenant_id = %s AND filename = %s) AS n""",
        (world.a.id, title, world.a.id, title),
    )
    return int(rows[0]["n"])


async def upload_and_delete(world: ApiWorld, name: str, data: bytes) -> None:
    """Accepted (201); the document is deleted at once, so that no later test indexes a large file."""
    r = await upload(world, name, data, "text/plain")
    assert r.status_code == 201, r.text
    gone = await world.client.delete(f"/api/v1/knowledge-base/{r.json()['document_id']}", headers=world.a.auth("admin"))
    assert gone.status_code == 204, gone.text


async def test_the_largest_file_is_the_plans_or_the_tenants_max_file_bytes(module_api_world: ApiWorld) -> None:
    w = module_api_world
    six = big_text(6 * MIB)
    # On the free plan, with its request rate lifted: the module's earlier tests count in this minute.
    unhurried = {"requests_per_minute": 10**6, "key_requests_per_minute": 10**6}
    try:
        # Free: 5 MiB. A 6 MiB file is refused like any too-large file (413, field `file`, the limit
        # in bytes and which it is), and nothing is stored.
        await admin_patch(w, {"plan": "free", "limits": unhurried})
        r = await upload(w, "six-free.txt", six, "text/plain")
        assert r.status_code == 413 and field_of(r) == ["file"], r.text
        detail = r.json()["detail"]
        assert f"the file has {6 * MIB} bytes, more than the {5 * MIB} allowed" in detail, detail
        assert "max_file_bytes (plan free)" in detail, detail
        assert await stored_titled(w, "six-free.txt") == 0
        # Pro: 20 MiB; the same file is taken.
        await admin_patch(w, {"plan": "pro", "limits": {}})
        await upload_and_delete(w, "six-pro.txt", six)
        # A per-tenant override lowers it...
        await admin_patch(w, {"limits": {"max_file_bytes": 1000}})
        r = await upload(w, "small-over.txt", big_text(1001), "text/plain")
        assert r.status_code == 413 and field_of(r) == ["file"], r.text
        assert "more than the 1000 allowed by the tenant's max_file_bytes (plan pro)" in r.json()["detail"], r.text
        assert await stored_titled(w, "small-over.txt") == 0
        await upload_and_delete(w, "small-fits.txt", big_text(1000))
        # ... or raises it above the plan's (here the free plan's 5 MiB).
        await admin_patch(w, {"plan": "free", "limits": {**unhurried, "max_file_bytes": 7 * MIB}})
        await upload_and_delete(w, "six-free-override.txt", six)
        # Not a number, or below 1: refused by the API's schema, naming the limit.
        h = w.headers(w.platform_token)
        for bad in (0, "big"):
            r = await w.client.patch(
                f"/api/v1/admin/tenants/{w.a.id}", json={"limits": {"max_file_bytes": bad}}, headers=h
            )
            assert r.status_code == 422 and "max_file_bytes" in r.text, r.text
    finally:
        await admin_patch(w, {"plan": "pro", "limits": {}})


async def test_roles_and_tenants(module_api_world: ApiWorld) -> None:
    w = module_api_world
    r = await upload(w, "v.txt", b"viewer text", role="viewer")
    assert r.status_code == 403
    body = await uploaded(w, "mine.txt", b"only for tenant a")
    r = await w.client.get(f"{FILES}/{body['id']}", headers=w.b.auth("owner"))
    assert r.status_code == 404
    r = await w.client.get(FILES, headers=w.b.auth("owner"), params={"limit": 100})
    assert body["id"] not in {f["id"] for f in r.json()["items"]}


# --- Units -------------------------------------------------------------------------------------------


def test_detection_reads_the_content_not_the_name() -> None:
    assert inspect(make_pdf(["x"]), "scan-0001", None, ROOMY) == extraction.PDF  # the name says nothing
    with pytest.raises(FileRefused):
        inspect(make_pdf(["x"]), "a.txt", None, ROOMY)  # the name says text: a lie
    assert inspect(b"# T\n\nbody", "a.md", "application/octet-stream", ROOMY) == extraction.MARKDOWN
    assert inspect(b"<html><body><p>x</p></body></html>", "page", None, ROOMY) == extraction.HTML
    assert inspect("Genève, déjà".encode("cp1252"), "old.txt", "text/plain", ROOMY) == extraction.TEXT
    with pytest.raises(FileRefused) as refused:
        inspect(b"\x00\x01\x02binary", "x.bin", None, ROOMY)
    assert refused.value.status == 415


def test_filenames_are_cleaned_and_quoted() -> None:
    assert clean_filename("../../etc/passwd") == "passwd"
    assert clean_filename("C:\\Users\\me\\rapport été.pdf") == "rapport été.pdf"
    assert clean_filename("\x00\n") == "file"
    header = content_disposition('rapport "été".pdf')
    assert header.startswith('attachment; filename="rapport __t__.pdf"')
    assert "filename*=UTF-8''rapport%20%22%C3%A9t%C3%A9%22.pdf" in header


def test_passages_of_a_paged_file_span_at_most_two_pages_and_number_across_it() -> None:
    sections = [extraction.Section(f"short page {n}", n) for n in range(1, 6)]
    chunks = list(chunk_sections(sections))
    assert [c.number for c in chunks] == list(range(len(chunks)))
    assert all(c.page_end - c.page_start <= 1 for c in chunks)  # type: ignore[operator]
    assert {p for c in chunks for p in (c.page_start, c.page_end)} == {1, 2, 3, 4, 5}
    text = "\n\n".join(s.text for s in sections)
    assert all(c.text.startswith(text[c.start : c.start + 10]) for c in chunks)


# --- Export, import, erase; the CLI ------------------------------------------------------------------


async def test_export_erase_import_round_trips_a_file(module_api_world: ApiWorld, tmp_path: Path) -> None:
    from iafactory.tenancy import portability

    w = module_api_world
    data = make_pdf(["Exported page one.", "Exported page two with \u00e9 and bytes."])
    body = await uploaded(w, "export.pdf", data)
    archive = tmp_path / "a.tar.gz"
    await portability.export_tenant(w.admin_url, w.a.slug, archive)
    with tarfile.open(archive) as tar:
        assert any("knowledge_files" in name for name in tar.getnames())
    copy = f"copy-{uuid.uuid4().hex[:8]}"
    await portability.import_tenant(w.admin_url, archive, copy)
    rows = await admin_rows(
        w,
        """SELECT f.content, f.sha256 FROM knowledge_files f JOIN tenants t ON t.id = f.tenant_id
           WHERE t.slug = %s AND f.id = %s""",
        (copy, body["id"]),
    )
    assert [bytes(r["content"]) for r in rows] == [data]
    await portability.erase_tenant(w.admin_url, copy, copy)
    assert not await admin_rows(
        w, "SELECT 1 FROM knowledge_files f JOIN tenants t ON t.id = f.tenant_id WHERE t.slug = %s", (copy,)
    )


def test_cli_imports_a_folder_with_a_summary(migrated_db: str, tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.pdf").write_bytes(make_pdf(["CLI imported page."]))
    (folder / "sub" / "b.md").write_bytes(b"# B\n\nMarkdown from a sub-folder.")
    (folder / "sub" / "c.docx").write_bytes(make_docx([(1, "C"), (0, "Word.")]))
    (folder / "empty.txt").write_bytes(b"")
    (folder / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # not an extension it imports: not even tried
    (folder / "fake.pdf").write_bytes(b"plain text in disguise")
    slug = "clifiles"
    env = {"IAFACTORY_EMBEDDING_PROVIDER": "none"}
    r = run_cli(
        "tenants", "create", "--name", "Cli Files", "--slug", slug, "--region", "CH", db_url=migrated_db, env=env
    )
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_cli("knowledge", "import", slug, str(folder), db_url=migrated_db, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "imported 3" in out and "skipped 2" in out, out
    assert "empty.txt" in out and "fake.pdf" in out, out
    assert stored(migrated_db, slug, "knowledge_files", "filename") == {"a.pdf", "b.md", "c.docx"}
    # Bad input: one line, exit code not 0.
    r = run_cli("knowledge", "import", slug, str(tmp_path / "missing"), db_url=migrated_db, env=env)
    assert r.returncode != 0 and "missing" in (r.stdout + r.stderr)
    r = run_cli("knowledge", "import", "no-such-tenant", str(folder), db_url=migrated_db, env=env)
    assert r.returncode != 0 and "no-such-tenant" in (r.stdout + r.stderr)


def stored(db_url: str, slug: str, table: str, column: str) -> set[str]:
    """One column of a tenant's rows, read as the owner (what really landed, whatever the CLI printed)."""
    with psycopg.connect(db_url) as conn:
        query = f"SELECT x.{column} FROM {table} x JOIN tenants t ON t.id = x.tenant_id WHERE t.slug = %s"
        return {row[0] for row in conn.execute(query, (slug,))}


def test_cli_skips_a_file_over_the_tenants_max_file_bytes_with_the_reason(migrated_db: str, tmp_path: Path) -> None:
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "six.txt").write_bytes(big_text(6 * MIB))  # over the free plan's 5 MiB
    (folder / "small.txt").write_bytes(b"A small note that fits.")
    slug = "clibigfile"
    env = {"IAFACTORY_EMBEDDING_PROVIDER": "none"}
    r = run_cli(
        "tenants", "create", "--name", "Cli Big", "--slug", slug, "--region", "CH", "--plan", "free",
        db_url=migrated_db, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_cli("knowledge", "import", slug, str(folder), db_url=migrated_db, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    out = " ".join(r.stdout.split())  # the console may wrap a long line
    assert "imported 1" in out and "skipped 1" in out, out
    assert "six.txt" in out and f"the file has {6 * MIB} bytes, more than the {5 * MIB} allowed" in out, out
    assert "max_file_bytes (plan free)" in out, out
    assert stored(migrated_db, slug, "knowledge_files", "filename") == {"small.txt"}
    assert stored(migrated_db, slug, "knowledge_base", "title") == {"small.txt"}
