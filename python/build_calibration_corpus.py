"""Builds the calibration corpus shipped in cqil_kernels/texts/ from Debian packages (bookworm).

    apt-get install jargon-text bible-kjv python3.11-doc libpython3.11-stdlib
    python python/build_calibration_corpus.py [--out cqil_kernels/texts]

Four kinds of text, each `--blocks` runs of consecutive paragraphs (about `--block-chars` characters each)
taken at evenly spaced places of its source, so that a kind is not one chapter of one document:

  lexicon    the Jargon File 4.4.7 (jargon-text 4.4.7-4.1), its paragraphs of prose     public domain
  narrative  the King James Bible, narrative books (bible-kjv-text 4.38, read with `bible`) public domain
  docs       the Python 3.11 tutorial (python3.11-doc), reStructuredText                 PSF License 2
  code       Python 3.11 standard-library modules (libpython3.11-stdlib)                  PSF License 2

Writes one .txt per kind, manifest.json (source, licence, sha256 of each file), which cqil_kernels.corpus
checks before use, and README.md (the sources, and the PSF licence as its clauses 2 and 3 ask). The output
is deterministic for the same package versions.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import subprocess
from pathlib import Path

DOCS = Path("/usr/share/doc/python3.11/html/_sources/tutorial")
STDLIB = Path("/usr/lib/python3.11")
TUTORIAL = ["appetite", "interpreter", "introduction", "controlflow", "datastructures", "modules",
            "inputoutput", "errors", "classes", "stdlib", "stdlib2", "venv", "floatingpoint"]
MODULES = ["textwrap", "fractions", "shlex", "heapq", "bisect", "calendar", "statistics", "difflib",
           "string", "colorsys", "fnmatch", "graphlib", "operator", "queue", "sched", "glob"]
BOOKS = ["Genesis 37:1-45:28", "Ruth 1:1-4:22", "1Samuel 17:1-17:58", "Esther 1:1-10:3", "Jonah 1:1-4:11",
         "Daniel 3:1-6:28", "Luke 15:1-15:32", "Acts 27:1-28:16"]
PSF = "Python Software Foundation License Version 2 (Copyright (c) 2001-2023 Python Software Foundation)"


def paragraphs(text: str, join_lines: bool) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", text):
        if not para.strip():
            continue
        out.append(" ".join(para.split()) if join_lines else para.strip("\n"))
    return out


def blocks(paras: list[str], n: int, chars: int) -> str:
    """`n` runs of consecutive paragraphs, about `chars` characters each, starting at evenly spaced
    paragraphs (the last run ends at the source's end at the latest)."""
    total = sum(len(p) for p in paras)
    if total < n * chars:
        raise SystemExit(f"source has {total} characters, fewer than {n} blocks of {chars}")
    starts = [round(i * (len(paras) - 1) / n) for i in range(n)]
    runs = []
    for s in starts:
        run, size = [], 0
        for p in paras[s:]:
            if size >= chars:
                break
            run.append(p)
            size += len(p)
        runs.append("\n\n".join(run))
    return "\n\n".join(runs) + "\n"


def lexicon() -> list[str]:
    """The File's paragraphs of prose (long ones: entries' definitions, the introduction, the folklore),
    not its tables of contents and headwords."""
    text = gzip.decompress(Path("/usr/share/doc/jargon-text/jargon.txt.gz").read_bytes()).decode("utf-8")
    return [p for p in paragraphs(text, True) if len(p) > 200]


def narrative(books: list[str] = BOOKS) -> list[str]:
    """A paragraph per chapter of the passages `books` (bible-kjv references), verse numbers left out."""
    paras = []
    for ref in books:
        out = subprocess.run(["bible", "-f", ref], check=True, capture_output=True, text=True).stdout
        chapter, verses = None, []
        for line in out.splitlines():
            m = re.match(r"^(\S+?)(\d+):(\d+) (.*)$", line)
            if not m:
                continue
            if m.group(2) != chapter and verses:
                paras.append(" ".join(verses))
                verses = []
            chapter = m.group(2)
            verses.append(m.group(4).strip())
        if verses:
            paras.append(" ".join(verses))
    return paras


def docs() -> list[str]:
    return [p for name in TUTORIAL for p in paragraphs((DOCS / f"{name}.rst.txt").read_text(), False)]


def code() -> list[str]:
    return [p for name in MODULES for p in paragraphs((STDLIB / f"{name}.py").read_text(), False)]


KINDS = {
    "lexicon": (lexicon, "The Jargon File 4.4.7, paragraphs of prose (Debian jargon-text 4.4.7-4.1, "
                         "/usr/share/doc/jargon-text/jargon.txt.gz)", "public domain"),
    "narrative": (narrative, "The King James Bible (1611): " + ", ".join(BOOKS) + " (Debian bible-kjv-text 4.38,"
                             " read with bible-kjv's `bible -f`)", "public domain"),
    "docs": (docs, "The Python 3.11 tutorial: " + ", ".join(TUTORIAL) + " (Debian python3.11-doc "
                   "3.11.2-6+deb12u8, " + str(DOCS) + ")", PSF),
    "code": (code, "Python 3.11 standard library: " + ", ".join(f"{m}.py" for m in MODULES) + " (Debian "
                   "libpython3.11-stdlib 3.11.2-6+deb12u8)", PSF),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("cqil_kernels/texts"))
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--block-chars", type=int, default=6000)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for kind, (read, source, licence) in KINDS.items():
        data = blocks(read(), a.blocks, a.block_chars).encode("utf-8")
        (a.out / f"{kind}.txt").write_bytes(data)
        manifest[kind] = dict(file=f"{kind}.txt", bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                              source=source, licence=licence)
        print(f"{kind}: {len(data)} bytes")
    (a.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    copyright_file = Path("/usr/share/doc/python3.11-doc/copyright").read_text()
    begin = copyright_file.index("PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2")
    psf = copyright_file[begin:copyright_file.index("BEOPEN.COM LICENSE AGREEMENT", begin)].rstrip()
    lines = ["# The calibration corpus", "",
             "Text that `cqil calibrate` and `cqil eval` measure on when no `--text` is given (cqil_kernels/"
             "corpus.py). Built by python/build_calibration_corpus.py from Debian bookworm packages: runs of "
             "consecutive paragraphs taken at evenly spaced places of each source, not edited otherwise "
             "(the Jargon File's and the Bible's paragraphs have their line breaks joined; the Bible's verse "
             "numbers are left out).", ""]
    for kind, entry in manifest.items():
        lines += [f"* `{entry['file']}` ({entry['bytes']} bytes): {entry['source']}. Licence: {entry['licence']}."]
    lines += ["", "The Python documentation and standard library: Copyright (c) 2001-2023 Python Software "
              "Foundation; All Rights Reserved. Used under the PSF licence, whose text follows.", "", "```",
              psf, "```", ""]
    (a.out / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
