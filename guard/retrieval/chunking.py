"""Documents -> sentence-aware chunks with overlap.

A chunk is whole sentences of one section (markdown headings start sections; a chunk never
spans two, so one chunk is about one thing), at most `max_words` words; the next chunk starts
with the last sentences of the previous one, up to `overlap_words`, so a fact split across a
boundary is whole in one of them. A sentence longer than `max_words` is cut into word windows
overlapping by `overlap_words`. Each chunk remembers its heading path, which is embedded with
it ("X200 manual > Battery" tells the encoder what "It charges in 4 hours" is about).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TEXT_SUFFIXES = (".md", ".markdown", ".txt")
PDF_SUFFIX = ".pdf"
SPLITTER = "sentences-v1"  # recorded in the manifest: a changed splitter means a rebuild

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d{1,3}[.)])\s+")
# A sentence ends at . ! or ? (optionally closed by a quote or bracket) before whitespace and an
# upper-case letter, digit, quote or bracket; common abbreviations and decimals do not end one.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z0-9\"'(\[])")
_ABBREVIATION = re.compile(r"(?:\b(?:e\.g|i\.e|etc|vs|approx|no|fig|mr|mrs|ms|dr|st|inc|ltd|cf)\.|\b[A-Z]\.)$", re.IGNORECASE)


@dataclass(frozen=True)
class ChunkingParams:
    max_words: int = 120  # MiniLM reads 256 word pieces: ~120 words and a heading fit
    overlap_words: int = 30

    def __post_init__(self) -> None:
        if self.max_words < 8:
            raise ValueError(f"max_words must be at least 8 (got {self.max_words})")
        if not 0 <= self.overlap_words < self.max_words // 2:
            raise ValueError(f"overlap_words must be >= 0 and below half of max_words (got {self.overlap_words})")


@dataclass(frozen=True)
class Document:
    path: str  # relative to the documents directory, with / separators
    text: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Chunk:
    document: str
    ordinal: int  # position within its document
    heading: str  # "Title > Section", or the document's file name without a heading
    text: str

    @property
    def id(self) -> str:
        return f"{self.document}#{self.ordinal}"

    def embedded_text(self) -> str:
        return f"{self.heading}\n{self.text}" if self.heading else self.text


def read_documents(directory: Path) -> list[Document]:
    """Every text, markdown and PDF file under `directory` (dotfiles and dot-directories skipped), sorted."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    documents = []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        suffix = path.suffix.lower()
        if suffix not in TEXT_SUFFIXES and suffix != PDF_SUFFIX:
            continue
        data = path.read_bytes()
        text = _pdf_text(path) if suffix == PDF_SUFFIX else data.decode("utf-8", errors="replace")
        documents.append(Document(relative.as_posix(), text, hashlib.sha256(data).hexdigest(), len(data)))
    return documents


def _pdf_text(path: Path) -> str:
    try:
        from pypdf import PdfReader
    except ImportError:  # pragma: no cover - pypdf comes with the retrieval extra
        raise RuntimeError(f"{path}: reading PDF needs pypdf (pip install 'guard[retrieval]')") from None
    # Pages become paragraphs: a page break never joins two sentences.
    return "\n\n".join(page.extract_text() or "" for page in PdfReader(path).pages)


def split_sentences(paragraph: str) -> list[str]:
    text = " ".join(paragraph.split())
    if not text:
        return []
    sentences, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        if _ABBREVIATION.search(text, 0, match.start()):
            continue
        sentences.append(text[start : match.start()].strip())
        start = match.end()
    sentences.append(text[start:].strip())
    return [s for s in sentences if s]


def _sections(document: Document) -> Iterator[tuple[str, list[str]]]:
    """(heading path, sentences) per section, in order. List items and table rows are sentences of their own."""
    headings: list[str] = []
    sentences: list[str] = []
    paragraph: list[str] = []
    markdown = not document.path.lower().endswith(".txt")

    def close_paragraph() -> None:
        if paragraph:
            sentences.extend(split_sentences(" ".join(paragraph)))
            paragraph.clear()

    for line in document.text.splitlines():
        heading = _HEADING.match(line) if markdown else None
        if heading is not None:
            close_paragraph()
            if sentences:
                yield _heading_path(headings, document), sentences
                sentences = []
            level = len(heading.group(1))
            headings = [*headings[: level - 1], heading.group(2)]
            continue
        if not line.strip():
            close_paragraph()
        elif _LIST_ITEM.match(line) or line.lstrip().startswith("|"):
            close_paragraph()
            sentences.extend(split_sentences(_LIST_ITEM.sub("", line).strip(" |")))
        else:
            paragraph.append(line)
    close_paragraph()
    if sentences:
        yield _heading_path(headings, document), sentences


def _heading_path(headings: list[str], document: Document) -> str:
    named = [h for h in headings if h]
    return " > ".join(named) if named else Path(document.path).stem


def chunk_document(document: Document, params: ChunkingParams) -> list[Chunk]:
    chunks: list[Chunk] = []
    for heading, sentences in _sections(document):
        for text in _pack(sentences, params):
            chunks.append(Chunk(document.path, len(chunks), heading, text))
    return chunks


def _pack(sentences: list[str], params: ChunkingParams) -> Iterator[str]:
    """Whole sentences up to max_words per chunk, each chunk starting with the previous one's last overlap_words."""
    pieces: list[list[str]] = []  # sentences as word lists; over-long ones cut into windows first
    for sentence in sentences:
        words = sentence.split()
        if len(words) <= params.max_words:
            pieces.append(words)
            continue
        step = params.max_words - params.overlap_words
        for start in range(0, len(words) - params.overlap_words, step):
            pieces.append(words[start : start + params.max_words])
    current: list[list[str]] = []
    for words in pieces:
        if current and sum(map(len, current)) + len(words) > params.max_words:
            yield " ".join(" ".join(s) for s in current)
            current = _tail(current, params.overlap_words)
            if sum(map(len, current)) + len(words) > params.max_words:
                current = []
        current.append(words)
    if current:  # its last sentence is in no chunk yet
        yield " ".join(" ".join(s) for s in current)


def _tail(sentences: list[list[str]], budget: int) -> list[list[str]]:
    """The last sentences of a chunk that fit in `budget` words (none if the last one alone does not)."""
    kept: list[list[str]] = []
    for words in reversed(sentences):
        if sum(map(len, kept)) + len(words) > budget:
            break
        kept.insert(0, words)
    return kept
