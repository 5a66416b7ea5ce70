"""Build the demo model's text corpus from files already on this machine (no downloads).

Four domains, each from places every Debian-like machine with a Python install has:

- ``python``: the running interpreter's standard library (``*.py``, not site-packages);
- ``c``: C headers under ``/usr/include`` (not C++) and ``*.c`` under ``/usr/share`` and ``/usr/src``;
- ``prose``: English text: Python's pydoc topics, ``/usr/share/common-licenses``, READMEs, NEWS, FAQs
  and text docs under ``/usr/share/doc``, and info manuals; only paragraphs that read as prose;
- ``shell``: shell scripts (shebang or ``.sh``), bash completions, dpkg maintainer scripts, and the
  world-readable configuration files under ``/etc`` (certificates and secrets excluded).

Documents are deduplicated (exact, after whitespace normalisation; prose also per paragraph) and
split train / held-out by a hash of their content, so the split is fixed whatever the file order.
The train split is capped per domain by a seeded shuffle. Output under ``--out`` (``var/corpus``):
``<domain>/{train,heldout}.jsonl`` (one ``{"source", "text"}`` per line) and ``manifest.json``
(per domain: sources, counts, characters and bytes per split, and every document's path and hash).

Usage: ``python tools/build_corpus.py [--out var/corpus] [--seed 0] [--max-train-chars 6000000]``
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import re
import stat
import sys
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

DOMAINS: tuple[str, ...] = ("python", "c", "prose", "shell")
MIN_BYTES = 64
MAX_BYTES = 256 * 1024  # larger files are generated tables or dumps, not typical text
HELDOUT_PERCENT = 8

_SHEBANG = re.compile(rb"#!\s*\S*/(?:env\s+)?(?:ba|da|k)?sh\b")
_SECRET = re.compile(r"shadow|passwd|secret|private|gpg|\.key$|\.pem$|\.crt$|\.asc$|ssh_host|sudoers")
_CPLUSPLUS = re.compile(r"\bnamespace\s+\w*\s*\{|\btemplate\s*<|\bstd::|^\s*(public|private|protected):", re.MULTILINE)
_PROSE_NAME = re.compile(r"^(readme|news|faq|todo|thanks|copyright|.*\.(txt|md|rst|info(-\d+)?))(\.gz)?$",
                         re.IGNORECASE)


@dataclass(frozen=True)
class Doc:
    """One document: where it came from and its text."""

    source: str
    text: str


def _walk(root: str) -> Iterator[Path]:
    """Regular files under root in sorted order, not following links."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if not path.is_symlink() and path.is_file():
                yield path


def _read_text(path: Path) -> str | None:
    """UTF-8 text of a plain or gzip file within the size bounds; None for anything else."""
    try:
        size = path.stat().st_size
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = fh.read(MAX_BYTES + 1)
        elif MIN_BYTES <= size <= MAX_BYTES:
            raw = path.read_bytes()
        else:
            return None
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if not MIN_BYTES <= len(raw) <= MAX_BYTES or b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def python_docs() -> Iterator[Doc]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in _walk(str(stdlib)):
        rel = path.relative_to(stdlib).parts
        if path.suffix != ".py" or rel[0] in ("site-packages", "pydoc_data"):
            continue
        if (text := _read_text(path)) is not None:
            yield Doc(str(path), text)


def c_docs() -> Iterator[Doc]:
    for path in _walk("/usr/include"):
        if path.suffix != ".h" or "/c++/" in str(path):
            continue
        # many .h files under /usr/include are C++
        if (text := _read_text(path)) and not _CPLUSPLUS.search(text):
            yield Doc(str(path), text)
    for root in ("/usr/share", "/usr/src"):
        for path in _walk(root):
            if path.suffix == ".c" and (text := _read_text(path)):
                yield Doc(str(path), text)


def _is_prose(paragraph: str) -> bool:
    """A paragraph of running English: enough words, mostly letters, not indented code."""
    words = paragraph.split()
    if len(words) < 12:
        return False
    chars = "".join(words)
    letters = sum(c.isalpha() for c in chars)
    lines = paragraph.splitlines()
    indented = sum(line.startswith(("    ", "\t")) for line in lines)
    mean_word = len(chars) / len(words)
    return letters / len(chars) >= 0.85 and indented * 2 <= len(lines) and 3.0 <= mean_word <= 9.0


def _prose_paragraphs(text: str, seen: set[str]) -> str:
    """The prose paragraphs of text not seen before (seen is updated), joined by blank lines."""
    # info files separate nodes with 0x1f; Debian copyright files separate paragraphs with " ."
    text = re.sub(r"(?m)^ \.$", "", text.replace("\x1f", "\n").replace("\r", ""))
    kept = []
    for block in re.split(r"\n\s*\n", text):
        para = "\n".join(line.rstrip() for line in block.strip("\n").splitlines())
        key = " ".join(para.split()).lower()
        if key in seen or not _is_prose(para):
            continue
        seen.add(key)
        kept.append(para)
    return "\n\n".join(kept)


def _prose_sources() -> Iterator[tuple[str, str]]:
    """(source, raw text) of every prose candidate, in a fixed order."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"pydoc_data.topics:{name}", topics[name]
    for root in ("/usr/share/common-licenses", "/usr/share/doc", "/usr/share/info"):
        for path in _walk(root):
            wanted = root != "/usr/share/doc" or _PROSE_NAME.match(path.name)
            if wanted and "changelog" not in path.name and (text := _read_text(path)) is not None:
                yield str(path), text


def prose_docs() -> Iterator[Doc]:
    seen: set[str] = set()
    for source, raw in _prose_sources():
        text = _prose_paragraphs(raw, seen)
        if len(text) >= MIN_BYTES:
            yield Doc(source, text)


def _is_shell(path: Path) -> bool:
    if path.suffix in (".sh", ".bash") or "bash-completion" in str(path):
        return True
    if path.parent == Path("/var/lib/dpkg/info"):
        return path.suffix in (".postinst", ".preinst", ".postrm", ".prerm", ".config")
    try:
        with path.open("rb") as fh:
            return _SHEBANG.match(fh.read(64)) is not None
    except OSError:
        return False


def _is_public_config(path: Path) -> bool:
    """World-readable files under /etc that cannot hold credentials or certificates."""
    mode = path.stat().st_mode
    return bool(mode & stat.S_IROTH) and not _SECRET.search(str(path)) and "/etc/ssl/" not in str(path)


def shell_docs() -> Iterator[Doc]:
    for root in ("/usr/bin", "/usr/sbin", "/usr/lib", "/usr/share", "/var/lib/dpkg/info"):
        for path in _walk(root):
            if "/python3" not in str(path) and _is_shell(path) and (text := _read_text(path)):
                yield Doc(str(path), text)
    for path in _walk("/etc"):
        if _is_public_config(path) and (text := _read_text(path)):
            yield Doc(str(path), text)


SOURCES: dict[str, Callable[[], Iterator[Doc]]] = {
    "python": python_docs, "c": c_docs, "prose": prose_docs, "shell": shell_docs,
}


def _digest(text: str) -> str:
    """Hash of the text with whitespace normalised, so re-indented copies count as duplicates."""
    return hashlib.sha256(" ".join(text.split()).encode()).hexdigest()


def split_domain(docs: Iterator[Doc], seed: int, max_train_chars: int) -> dict[str, list[tuple[Doc, str]]]:
    """Deduplicate, split by content hash, cap the train split by a seeded shuffle.

    Returns {"train": [(doc, digest)], "heldout": [...]}, each in a fixed order. The held-out
    split is the documents whose hash falls in the first HELDOUT_PERCENT of the hash range, so it
    does not depend on the file order or the cap; it is capped at a tenth of the train cap.
    """
    unique: dict[str, Doc] = {}
    for doc in docs:
        unique.setdefault(_digest(doc.text), doc)
    splits: dict[str, list[tuple[Doc, str]]] = {"train": [], "heldout": []}
    for digest in sorted(unique):
        split = "heldout" if int(digest[:8], 16) % 100 < HELDOUT_PERCENT else "train"
        splits[split].append((unique[digest], digest))
    caps = {"train": max_train_chars, "heldout": max_train_chars // 10}
    for split, items in splits.items():
        random.Random(f"{seed}:{split}").shuffle(items)
        kept, total = [], 0
        for doc, digest in items:
            if total + len(doc.text) > caps[split]:
                continue
            kept.append((doc, digest))
            total += len(doc.text)
        splits[split] = kept
    return splits


def write_domain(out: Path, domain: str, splits: dict[str, list[tuple[Doc, str]]]) -> dict[str, object]:
    """Write <out>/<domain>/<split>.jsonl; return the domain's manifest entry."""
    (out / domain).mkdir(parents=True, exist_ok=True)
    entry: dict[str, object] = {}
    for split, items in splits.items():
        with (out / domain / f"{split}.jsonl").open("w", encoding="utf-8") as fh:
            for doc, _ in items:
                fh.write(json.dumps({"source": doc.source, "text": doc.text}, ensure_ascii=False) + "\n")
        entry[split] = {
            "documents": len(items),
            "chars": sum(len(doc.text) for doc, _ in items),
            "bytes": sum(len(doc.text.encode()) for doc, _ in items),
            "roots": _roots(doc.source for doc, _ in items),
            "files": [[doc.source, digest[:16], len(doc.text)] for doc, digest in items],
        }
    return entry


def _roots(sources: Iterator[str]) -> dict[str, int]:
    """Documents per source root (first three path levels), for the manifest summary."""
    counts: dict[str, int] = {}
    for source in sources:
        root = source.split(":")[0] if ":" in source else "/".join(source.split("/")[:4])
        counts[root] = counts.get(root, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("var/corpus"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-train-chars", type=int, default=6_000_000,
                        help="cap of the train split per domain, in characters")
    args = parser.parse_args(argv)
    manifest: dict[str, object] = {
        "seed": args.seed, "max_train_chars": args.max_train_chars, "heldout_percent": HELDOUT_PERCENT,
        "python": sys.version.split()[0], "domains": {},
    }
    domains: dict[str, object] = {}
    for domain in DOMAINS:
        splits = split_domain(SOURCES[domain](), args.seed, args.max_train_chars)
        domains[domain] = write_domain(args.out, domain, splits)
        sizes = {s: (len(v), sum(len(d.text) for d, _ in v)) for s, v in splits.items()}
        print(f"{domain:7s} " + "  ".join(f"{s}: {n} docs {c / 1e6:.2f}M chars" for s, (n, c) in sizes.items()))
    manifest["domains"] = domains
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
