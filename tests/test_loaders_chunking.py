"""Loaders (each content type, limits, doc ids) and the chunker; no services, no model weights
beyond the bundled tokenizer."""

from __future__ import annotations

import base64
import itertools
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from ingestion.chunking import Chunker
from ingestion.loaders import LoadError, load
from shared.documents import (
    content_type_for,
    document_from_bytes,
    document_from_file,
    sanitize_doc_id,
)
from shared.embeddings import model_dir
from shared.messages import IngestDocument


def make_pdf(*lines: str) -> bytes:
    """A minimal one-page PDF whose content stream draws `lines` in Helvetica: a real text
    layer, with a correct cross-reference table."""
    ops = ["BT", "/F1 12 Tf", "72 720 Td", "14 TL"]
    for line in lines:
        escaped = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        ops += [f"({escaped}) Tj", "T*"]
    stream = "\n".join([*ops, "ET"]).encode("latin-1")
    return _pdf_file(
        [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
            b" /Resources << /Font << /F1 5 0 R >> >> >>",
            b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        ]
    )


def make_image_only_pdf() -> bytes:
    """A valid PDF whose page only paints a rectangle: no text layer, as in a scan."""
    stream = b"0 0 1 rg 100 100 200 200 re f"
    return _pdf_file(
        [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R >>",
            b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
        ]
    )


def _pdf_file(objects: list[bytes]) -> bytes:
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def doc(**fields: object) -> IngestDocument:
    values: dict[str, object] = {"doc_id": "d1", "enqueued_at": time.time()}
    values.update(fields)
    return IngestDocument(**values)  # type: ignore[arg-type]


def pdf_doc(data: bytes, **fields: object) -> IngestDocument:
    b64 = base64.b64encode(data).decode()
    return doc(content_type="application/pdf", data_b64=b64, **fields)


# --- loaders ---------------------------------------------------------------------------------


def test_plain_text_is_kept() -> None:
    loaded = load(doc(text="Hello\n\nworld", title="Greeting"))
    assert loaded.text == "Hello\n\nworld"
    assert loaded.title == "Greeting"


def test_markdown_title_is_the_first_heading() -> None:
    text = "Intro line\n## Not this\n# The Title\nBody text\n# Second"
    loaded = load(doc(content_type="text/markdown", text=text))
    assert loaded.text == text
    assert loaded.title == "The Title"
    given = load(doc(content_type="text/markdown", text=text, title="Given"))
    assert given.title == "Given"
    assert load(doc(content_type="text/markdown", text="no heading")).title is None


def test_html_drops_scripts_styles_and_navigation() -> None:
    html = """<html><head><title>  Page   Title </title><style>body {color: red}</style>
    <script>var secret = "tracking";</script></head>
    <body><nav><a href="/">Home</a> <a href="/x">Menu link</a></nav>
    <h1>Heading One</h1><p>First <b>bold</b> paragraph.</p><p>Second paragraph.</p>
    <noscript>enable js</noscript></body></html>"""
    loaded = load(doc(content_type="text/html", text=html))
    assert loaded.title == "Page Title"
    assert "First bold paragraph." in loaded.text  # inline tags do not break the line
    assert "Heading One\n" in loaded.text
    assert "Second paragraph." in loaded.text
    for hidden in ("secret", "color", "Menu link", "Home", "enable js", "Page Title"):
        assert hidden not in loaded.text


def test_html_title_falls_back_to_the_first_h1() -> None:
    loaded = load(doc(content_type="text/html", text="<h1>Main <i>Topic</i></h1><p>Body</p>"))
    assert loaded.title == "Main Topic"
    assert loaded.text == "Main Topic\n\nBody"


def test_pdf_text_layer_is_extracted() -> None:
    data = make_pdf("Sluice ingests portable documents.", "Second line (with parens).")
    loaded = load(pdf_doc(data))
    assert "Sluice ingests portable documents." in loaded.text
    assert "Second line (with parens)." in loaded.text
    assert load(pdf_doc(data, title="Manual")).title == "Manual"


def test_pdf_without_text_layer_fails_clearly() -> None:
    with pytest.raises(LoadError, match="no text layer"):
        load(pdf_doc(make_image_only_pdf()))


@pytest.mark.parametrize("data", [b"this is not a PDF at all", b"%PDF-1.4\n1 0 obj\n<< /Ty"])
def test_garbage_pdf_fails_clearly(data: bytes) -> None:
    with pytest.raises(LoadError, match="PDF"):
        load(pdf_doc(data))


def test_a_pdf_past_its_page_or_time_limit_fails_clearly() -> None:
    """Untrusted PDFs were parsed with no page cap or time limit, in a thread nobody can stop.
    Now a child process parses them, and is killed past the limit."""
    from ingestion.loaders import PdfLimits

    three_pages = _pdf_file(
        [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R 4 0 R 5 0 R] /Count 3 >>",
            *[b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>"] * 3,
        ]
    )
    with pytest.raises(LoadError, match="3 pages, more than 2"):
        load(pdf_doc(three_pages), pdf=PdfLimits(max_pages=2))
    data = make_pdf("A line.")
    started = time.monotonic()
    with pytest.raises(LoadError, match=r"longer than 0\.001 s"):
        load(pdf_doc(data), pdf=PdfLimits(timeout_s=0.001))
    assert time.monotonic() - started < 10  # it did not wait for the parse
    assert "A line." in load(pdf_doc(data)).text  # and the next parse works


def test_invalid_base64_fails_clearly() -> None:
    with pytest.raises(LoadError, match="base64"):
        load(doc(content_type="application/pdf", data_b64="not base64!"))


def test_size_limit() -> None:
    text = "é" * 600  # 1200 bytes in UTF-8
    assert load(doc(text=text), max_bytes=1200).text == text
    with pytest.raises(LoadError, match="more than the limit of 1199"):
        load(doc(text=text), max_bytes=1199)
    pdf = make_pdf("small")
    with pytest.raises(LoadError, match="limit"):
        load(pdf_doc(pdf), max_bytes=len(pdf) - 1)


def test_blank_document_fails() -> None:
    with pytest.raises(LoadError, match="no text"):
        load(doc(text=" \n\t "))
    with pytest.raises(LoadError, match="no text"):
        load(doc(content_type="text/html", text="<script>x()</script>"))


# --- building documents ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("notes.txt", "notes.txt"),
        ("docs/guide v2.md", "docs/guide_v2.md"),
        ("Café Menü/été.html", "Cafe_Menu/ete.html"),
        ("a  &  b?.pdf", "a_b_.pdf"),
        ("user@host:dir/x.md", "user@host:dir/x.md"),
    ],
)
def test_doc_ids_are_sanitized(name: str, expected: str) -> None:
    assert sanitize_doc_id(name) == expected
    doc(doc_id=sanitize_doc_id(name), text="x")  # accepted by the message schema


def test_doc_ids_without_usable_characters_or_too_long_get_a_hash() -> None:
    assert sanitize_doc_id("日本語").startswith("doc-")
    assert sanitize_doc_id("日本語") != sanitize_doc_id("中文")
    long_a, long_b = "a" * 300 + "1", "a" * 300 + "2"
    assert len(sanitize_doc_id(long_a)) == 200
    assert sanitize_doc_id(long_a) != sanitize_doc_id(long_b)


def test_document_from_file(tmp_path: Path) -> None:
    (tmp_path / "sub dir").mkdir()
    md = tmp_path / "sub dir" / "Read Me.md"
    md.write_text("\ufeff# Title\nbody", encoding="utf-8")
    d = document_from_file(md, root=tmp_path, metadata={"team": "ml"})
    assert d.doc_id == "sub_dir/Read_Me.md"
    assert d.source == "sub dir/Read Me.md"
    assert d.content_type == "text/markdown"
    assert d.text == "# Title\nbody"  # the BOM is gone
    assert d.metadata == {"team": "ml"}
    assert document_from_file(md).doc_id == "Read_Me.md"
    with pytest.raises(ValueError, match="not inside"):
        document_from_file(md, root=tmp_path / "elsewhere")


def test_document_from_file_pdf_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "paper.PDF"
    path.write_bytes(make_pdf("Round trip text."))
    d = document_from_file(path, root=tmp_path)
    assert d.content_type == "application/pdf"
    assert "Round trip text." in load(d).text


def test_document_from_bytes() -> None:
    d = document_from_bytes("page.htm", b"<p>hi</p>", doc_id="custom-id")
    assert (d.doc_id, d.content_type, d.text, d.action) == (
        "custom-id",
        "text/html",
        "<p>hi</p>",
        "upsert",
    )
    assert document_from_bytes("bad\xff.txt", b"ok \xff").text == "ok \ufffd"
    titled = document_from_bytes("a.md", b"# Heading", title="Given", metadata={"n": 1})
    assert (titled.title, titled.metadata, load(titled).title) == ("Given", {"n": 1}, "Given")


def test_unknown_file_type_is_refused() -> None:
    assert content_type_for("x.markdown") == "text/markdown"
    assert issubclass(LoadError, ValueError)  # what the API and `sluice ingest` catch
    with pytest.raises(ValueError, match=r"unsupported file type '\.docx'"):
        document_from_bytes("report.docx", b"...")


# --- chunking --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(model_dir("all-MiniLM-L6-v2"))


def long_text(paragraphs: int = 6, sentences: int = 25) -> str:
    return "\n\n".join(
        " ".join(f"Paragraph {p} sentence {s} talks about topic {p * s}." for s in range(sentences))
        for p in range(paragraphs)
    )


def test_chunks_never_exceed_the_limit(tokenizer) -> None:  # type: ignore[no-untyped-def]
    chunker = Chunker(tokenizer, max_tokens=256, chunk_tokens=48, overlap_tokens=8)
    text = long_text() + "\n\n" + "x" * 3000 + "\n\n" + "ünïcödé текст 日本語 " * 100
    chunks = chunker.split(text)
    assert len(chunks) > 10
    for chunk in chunks:
        assert chunk.strip()
        n = len(tokenizer(chunk, add_special_tokens=False).input_ids)
        assert n <= 48, (n, chunk)


def test_chunk_size_is_capped_at_the_model_window(tokenizer) -> None:  # type: ignore[no-untyped-def]
    chunker = Chunker(tokenizer, max_tokens=256, chunk_tokens=1000, overlap_tokens=600)
    assert chunker.chunk_tokens == 254  # [CLS] and [SEP] take two of the 256
    assert chunker.overlap_tokens == 127
    for chunk in chunker.split(long_text(paragraphs=10, sentences=60)):
        # What the model sees, special tokens included, fits: nothing is truncated.
        assert len(tokenizer(chunk).input_ids) <= 256


def test_chunks_overlap(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = " ".join(f"w{i}" for i in range(400))
    overlapping = Chunker(tokenizer, 256, chunk_tokens=40, overlap_tokens=10).split(text)
    for before, after in itertools.pairwise(overlapping):
        assert before.split()[-1] in after.split()[:10]
    separate = Chunker(tokenizer, 256, chunk_tokens=40, overlap_tokens=0).split(text)
    assert " ".join(separate).split() == text.split()  # no overlap: words appear once
    assert len(overlapping) > len(separate)


def test_short_text_is_one_chunk_and_blank_is_none(tokenizer) -> None:  # type: ignore[no-untyped-def]
    chunker = Chunker(tokenizer, 256, chunk_tokens=64, overlap_tokens=8)
    assert chunker.split("  One short paragraph.  ") == ["One short paragraph."]
    assert chunker.split(" \n\n \n") == []
