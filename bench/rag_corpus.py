"""Build a labelled retrieval set from text nobody in the project wrote: the docstrings of
Python's standard library, which every machine with Python has.

Each public function or method with a long enough docstring becomes a document
(`<out>/pydoc/<module>.<qualname>.txt`): its name and signature, then its docstring *without
the first paragraph*. That first paragraph (the summary) becomes the query, labelled with the
document it was cut from. So a query never appears verbatim in its document: finding it needs the
meaning (dense) or shared words from the body and the name (BM25).

    python -m bench.rag_corpus OUT_DIR [--queries 150]
    -> OUT_DIR/pydoc/*.txt (ingest with `sluice ingest OUT_DIR/pydoc`)
    -> OUT_DIR/queries.jsonl ({"query", "relevant_doc_ids"}) for `sluice eval retrieval`
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import sys
import warnings
from pathlib import Path

MODULES = [
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message",
    "email.utils", "enum", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getpass",
    "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "http.cookies",
    "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "logging", "lzma", "mailbox",
    "mimetypes", "ntpath", "operator", "os", "pathlib", "pickle", "pkgutil", "platform",
    "poplib", "posixpath", "pprint", "queue", "random", "re", "sched", "secrets", "selectors",
    "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver", "sqlite3", "ssl",
    "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "trace", "traceback", "typing", "unittest.case",
    "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "webbrowser", "wave",
    "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zoneinfo",
]  # fmt: skip
MIN_SUMMARY_WORDS = 5
MIN_BODY_WORDS = 25
SEED = 20261128


def functions(module_name: str) -> list[tuple[str, object]]:
    """(qualified name, object) of the module's public functions and class methods."""
    module = importlib.import_module(module_name)
    found = []
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            found.append((f"{module_name}.{name}", obj))
        elif inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if not attr.startswith("_") and inspect.isfunction(member):
                    found.append((f"{module_name}.{name}.{attr}", member))
    return found


def split_doc(doc: str) -> tuple[str, str]:
    """(summary = first paragraph, body = the rest), whitespace normalised."""
    paragraphs = [" ".join(p.split()) for p in inspect.cleandoc(doc).split("\n\n")]
    return paragraphs[0], "\n\n".join(p for p in paragraphs[1:] if p)


def signature(obj: object) -> str:
    try:
        return str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "(...)"


def build(out: Path, n_queries: int) -> tuple[int, int]:
    docs_dir = out / "pydoc"
    docs_dir.mkdir(parents=True, exist_ok=True)
    candidates: list[tuple[str, str]] = []  # (doc_id, query)
    seen_summaries: set[str] = set()
    n_docs = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name in MODULES:
            for qualname, obj in functions(module_name):
                doc = inspect.getdoc(obj)
                if not doc:
                    continue
                summary, body = split_doc(doc)
                if len(body.split()) < MIN_BODY_WORDS:
                    continue
                name = f"{qualname}.txt"
                (docs_dir / name).write_text(f"{qualname}{signature(obj)}\n\n{body}\n")
                n_docs += 1
                # A summary shared by several functions cannot label one of them.
                if len(summary.split()) >= MIN_SUMMARY_WORDS and summary not in seen_summaries:
                    candidates.append((f"pydoc/{name}", summary))
                seen_summaries.add(summary)
    random.Random(SEED).shuffle(candidates)
    with open(out / "queries.jsonl", "w") as f:
        for doc_id, query in sorted(candidates[:n_queries]):
            f.write(json.dumps({"query": query, "relevant_doc_ids": [doc_id]}) + "\n")
    return n_docs, min(n_queries, len(candidates))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--queries", type=int, default=150)
    args = parser.parse_args(argv)
    n_docs, n_queries = build(args.out, args.queries)
    print(f"{n_docs} documents, {n_queries} queries; Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
