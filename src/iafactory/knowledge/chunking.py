"""Splitting a document into passages of about 300-500 tokens, on headings and paragraphs, with
some overlap, keeping character offsets (for citations) and the heading path; for a paged file
(PDF), the pages each passage comes from (`chunk_sections`)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Protocol

TARGET_WORDS = 300  # ~400 tokens for the e5 tokenizer on European text
MAX_WORDS = 380
OVERLAP_WORDS = 40

_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


@dataclass(frozen=True)
class Chunk:
    number: int
    text: str
    start: int
    end: int
    heading_path: str
    page_start: int | None = None  # the pages of a paged file it comes from (None: no pages)
    page_end: int | None = None

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(f"{self.heading_path}\n{self.text}".encode()).hexdigest()


@dataclass
class _Block:
    start: int
    end: int
    headings: tuple[str, ...]


def _blocks(text: str) -> list[_Block]:
    """Paragraphs, each with the headings above it; a heading line ends the block before it."""
    blocks: list[_Block] = []
    headings: list[tuple[int, str]] = []
    pos = 0
    for para in _PARAGRAPH_BREAK.split(text):
        start = text.find(para, pos)
        pos = start + len(para)
        offset = start
        body_start = None
        for line in para.splitlines(keepends=True):
            m = _HEADING.match(line.strip())
            if m:
                if body_start is not None:
                    blocks.append(_Block(body_start, offset, tuple(h for _, h in headings)))
                    body_start = None
                level = len(m.group(1))
                headings = [(lvl, h) for lvl, h in headings if lvl < level] + [(level, m.group(2))]
            elif line.strip() and body_start is None:
                body_start = offset
            offset += len(line)
        if body_start is not None:
            blocks.append(_Block(body_start, start + len(para), tuple(h for _, h in headings)))
    return blocks


def _words(text: str, start: int, end: int) -> list[tuple[int, int]]:
    return [(start + m.start(), start + m.end()) for m in re.finditer(r"\S+", text[start:end])]


def chunk_text(text: str) -> list[Chunk]:
    """Consecutive blocks under the same headings are packed up to ~TARGET_WORDS; a longer block
    is cut into windows of MAX_WORDS words that overlap by OVERLAP_WORDS."""
    chunks: list[Chunk] = []

    def emit(start: int, end: int, headings: tuple[str, ...]) -> None:
        body = text[start:end].strip()
        if body:
            lead = len(text[start:end]) - len(text[start:end].lstrip())
            chunks.append(Chunk(len(chunks), body, start + lead, start + lead + len(body), " > ".join(headings)))

    pending: list[tuple[int, int]] = []  # words of the chunk being packed
    pending_headings: tuple[str, ...] = ()
    for block in _blocks(text):
        words = _words(text, block.start, block.end)
        if not words:
            continue
        if pending and (block.headings != pending_headings or len(pending) + len(words) > MAX_WORDS):
            emit(pending[0][0], pending[-1][1], pending_headings)
            pending = []
        pending_headings = block.headings
        if len(words) <= MAX_WORDS - len(pending):
            pending.extend(words)
            if len(pending) >= TARGET_WORDS:
                emit(pending[0][0], pending[-1][1], pending_headings)
                pending = []
            continue
        # A long block: windows with overlap.
        step = MAX_WORDS - OVERLAP_WORDS
        for i in range(0, len(words), step):
            window = words[i : i + MAX_WORDS]
            emit(window[0][0], window[-1][1], block.headings)
            if i + MAX_WORDS >= len(words):
                break
    if pending:
        emit(pending[0][0], pending[-1][1], pending_headings)
    return chunks


class _Section(Protocol):  # the shape chunk_sections reads (extraction.Section)
    @property
    def text(self) -> str: ...

    @property
    def page(self) -> int | None: ...


def chunk_sections(sections: Iterable[_Section]) -> Iterator[Chunk]:
    """Chunks of a file read a section at a time (a PDF page by page), numbered across the file.

    Offsets are in the file's text: the sections joined by a blank line. A passage never spans
    more than two pages: each page is chunked on its own, then a short last passage of a page and
    a short first passage of the next one are joined when they fit in one (TARGET_WORDS) and sit
    under the same headings. Only one pending passage is held: memory does not grow with the file.
    """
    offset = 0
    number = 0
    pending: Chunk | None = None
    for section in sections:
        for chunk in chunk_text(section.text):
            placed = replace(
                chunk,
                start=chunk.start + offset,
                end=chunk.end + offset,
                page_start=section.page,
                page_end=section.page,
            )
            if pending is not None:
                joined = len(pending.text.split()) + len(placed.text.split())
                if (
                    joined <= TARGET_WORDS
                    and pending.heading_path == placed.heading_path
                    and pending.page_end != placed.page_start
                    and pending.page_start == pending.page_end
                ):
                    pending = replace(
                        pending,
                        text=f"{pending.text}\n\n{placed.text}",
                        end=placed.end,
                        page_end=placed.page_end,
                    )
                    continue
                yield replace(pending, number=number)
                number += 1
            pending = placed
        offset += len(section.text) + 2
    if pending is not None:
        yield replace(pending, number=number)
