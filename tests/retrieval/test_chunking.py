"""Sentence-aware chunking: whole sentences, one section per chunk, overlap between neighbours, stable ids."""

from __future__ import annotations

import pytest

from guard.retrieval.chunking import ChunkingParams, Document, chunk_document, read_documents, split_sentences
from tests.support.manuals import write_manuals


def doc(text: str, path: str = "manual.md") -> Document:
    return Document(path, text, "0" * 64, len(text))


def test_sentences_end_at_stops_but_not_at_abbreviations_or_decimals():
    text = "The tank holds 1.2 litres, e.g. enough for 8 cups. Descale it! Is it F2? Yes (see Fig. 3). Done."
    assert split_sentences(text) == [
        "The tank holds 1.2 litres, e.g. enough for 8 cups.", "Descale it!", "Is it F2?", "Yes (see Fig. 3).", "Done.",
    ]


def test_markdown_headings_start_chunks_and_name_them(tmp_path):
    documents = read_documents(write_manuals(tmp_path))
    assert [d.path for d in documents] == ["aurora-x200.md", "nimbus-k7.md", "quill-q1.md", "tundra-t5.txt"]
    chunks = chunk_document(documents[0], ChunkingParams())
    assert [c.heading for c in chunks] == [
        "Aurora X200 cordless vacuum > Charging the battery",
        "Aurora X200 cordless vacuum > Cleaning the filter",
        "Aurora X200 cordless vacuum > Error codes",
    ]
    assert [c.id for c in chunks] == ["aurora-x200.md#0", "aurora-x200.md#1", "aurora-x200.md#2"]
    # List items are sentences of their own, without their bullets.
    assert chunks[2].text.startswith("E3 (red light blinking): the brush roll is blocked.")
    assert chunks[0].embedded_text().startswith("Aurora X200 cordless vacuum > Charging the battery\nPlace the X200")
    # A .txt file has no markdown headings: its chunks are named after the file.
    assert {c.heading for c in chunk_document(documents[3], ChunkingParams())} == {"tundra-t5"}


def test_long_sections_become_overlapping_chunks_of_whole_sentences():
    sentences = [f"Sentence {i} has exactly seven words here." for i in range(40)]  # 7 words each
    chunks = chunk_document(doc("# Title\n\n" + " ".join(sentences)), ChunkingParams(max_words=50, overlap_words=15))
    assert len(chunks) > 1
    for chunk in chunks:
        assert len(chunk.text.split()) <= 50
        assert all(part + "." in sentences for part in chunk.text.removesuffix(".").split(". "))  # whole sentences only
    for before, after in zip(chunks, chunks[1:]):
        # The next chunk repeats the previous one's last two sentences (14 words <= 15).
        assert before.text.split()[-14:] == after.text.split()[:14]
    covered = " ".join(c.text for c in chunks)
    assert all(s in covered for s in sentences)


def test_a_sentence_longer_than_a_chunk_is_cut_into_overlapping_windows():
    words = [f"w{i}" for i in range(100)]
    chunks = chunk_document(doc(" ".join(words) + "."), ChunkingParams(max_words=40, overlap_words=10))
    texts = [c.text.split() for c in chunks]
    assert all(len(t) <= 40 for t in texts)
    assert texts[0][:2] == ["w0", "w1"] and texts[-1][-1] == "w99."
    for before, after in zip(texts, texts[1:]):
        assert before[-10:] == after[:10]


def test_dotfiles_and_other_formats_are_skipped_and_pdf_text_is_read(tmp_path):
    (tmp_path / ".hidden.md").write_text("# Secret\nNot indexed.")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "guide.pdf").write_bytes(_one_page_pdf("The K7 descale light turns orange."))
    [pdf] = read_documents(tmp_path)
    assert pdf.path == "sub/guide.pdf" and "descale light turns orange" in pdf.text


@pytest.mark.parametrize(("max_words", "overlap"), [(4, 0), (40, 20), (40, -1)])
def test_bad_parameters_are_refused(max_words, overlap):
    with pytest.raises(ValueError):
        ChunkingParams(max_words=max_words, overlap_words=overlap)


def _one_page_pdf(text: str) -> bytes:
    """A minimal PDF with one line of Helvetica text (written by hand: no PDF writer is a dependency)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)
