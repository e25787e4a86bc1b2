"""Turn an `IngestDocument` into plain text (and a title).

Every failure a document itself causes (too big, not decodable, a PDF without a text layer)
is a `LoadError` with a reason meant for people: ingestion records it in the document's status
and dead-letters the message, so retrying would not help.

Building an `IngestDocument` from a file is shared/documents.py's job (the API and `sluice
ingest` do it too). The parsers (BeautifulSoup, pypdf) are imported where used.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ingestion import sandbox
from shared.messages import IngestDocument

if TYPE_CHECKING:
    from bs4 import BeautifulSoup
    from pypdf import PdfReader

# Not text a reader sees; <title> is returned separately.
_HIDDEN_HTML = ("script", "style", "nav", "noscript", "template", "title")
# Elements that end a line when rendered, so their texts must not run together.
_HTML_BLOCKS = (
    "address", "article", "aside", "blockquote", "br", "dd", "div", "dl", "dt", "figcaption",
    "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "main", "ol",
    "p", "pre", "section", "table", "td", "th", "tr", "ul",
)  # fmt: skip


class LoadError(ValueError):
    """The document cannot be turned into text; `reason` says why. A ValueError, as callers
    that build documents from user input treat bad input."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class LoadedText:
    text: str
    title: str | None


@dataclass(frozen=True)
class PdfLimits:
    max_pages: int = 500
    timeout_s: float = 60.0


def load(
    doc: IngestDocument, max_bytes: int | None = None, pdf: PdfLimits = PdfLimits()
) -> LoadedText:
    """The document's text; raises LoadError if it is over `max_bytes` or has no text. A PDF is
    parsed in a child process (ingestion/sandbox.py) within `pdf`'s limits."""
    if doc.content_type == "application/pdf":
        data = _decode_b64(doc.data_b64 or "", max_bytes)
        try:
            loaded = sandbox.run(_load_pdf, (data, doc.title, pdf.max_pages), pdf.timeout_s)
        except sandbox.SandboxError as e:
            raise LoadError(f"cannot parse the PDF: {e.reason}") from e
    else:
        text = doc.text or ""
        _check_size(len(text.encode("utf-8")), max_bytes)
        if doc.content_type == "text/html":
            loaded = _load_html(text, doc.title)
        elif doc.content_type == "text/markdown":
            loaded = LoadedText(text, doc.title or _markdown_title(text))
        else:
            loaded = LoadedText(text, doc.title)
    if not loaded.text.strip():
        raise LoadError("the document has no text")
    return loaded


def _check_size(size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise LoadError(f"the document has {size} bytes, more than the limit of {max_bytes}")


def _decode_b64(data_b64: str, max_bytes: int | None) -> bytes:
    # Checked before decoding so an oversized upload is never held twice in memory.
    _check_size(len(data_b64) * 3 // 4, max_bytes)
    try:
        data = base64.b64decode(data_b64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise LoadError(f"data_b64 is not valid base64: {e}") from e
    _check_size(len(data), max_bytes)
    return data


def _markdown_title(text: str) -> str | None:
    for line in text.splitlines():
        if line.startswith("# "):
            return line[2:].strip().strip("#").strip() or None
    return None


def _load_html(html: str, title: str | None) -> LoadedText:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    title = title or _html_title(soup)
    for tag in soup.find_all(_HIDDEN_HTML):
        tag.decompose()
    for tag in soup.find_all(_HTML_BLOCKS):
        tag.insert_before("\n")
        tag.insert_after("\n")
    return LoadedText(_tidy_lines(soup.get_text()), title)


def _html_title(soup: BeautifulSoup) -> str | None:
    for name in ("title", "h1"):
        tag = soup.find(name)
        if tag is not None and (text := " ".join(tag.get_text().split())):
            return text
    return None


def _tidy_lines(text: str) -> str:
    """Collapse spaces within lines and runs of blank lines, keeping paragraph breaks, which
    the chunker prefers to split at."""
    lines = [" ".join(line.split()) for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _load_pdf(data: bytes, title: str | None, max_pages: int) -> LoadedText:
    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise LoadError("the PDF is encrypted with a password")
        if len(reader.pages) > max_pages:
            raise LoadError(f"the PDF has {len(reader.pages)} pages, more than {max_pages}")
        pages = [page.extract_text() or "" for page in reader.pages]
        meta_title = _pdf_title(reader)
    except LoadError:
        raise
    except Exception as e:  # pypdf raises many types for damaged files
        raise LoadError(f"cannot parse the PDF: {type(e).__name__}: {e}") from e
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    if not text:
        raise LoadError("the PDF has no text layer (scanned or image-only PDFs need OCR first)")
    return LoadedText(text, title or meta_title)


def _pdf_title(reader: PdfReader) -> str | None:
    title = reader.metadata.title if reader.metadata else None
    return str(title).strip() or None if title else None
