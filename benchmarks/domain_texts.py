"""Text of several kinds for measuring a grouping or an adapter away from the text it was chosen or trained
on (benchmarks/kd_domains.py), none of it in the shipped corpus (cqil_kernels/texts):

    apt-get install jargon-text bible-kjv python3.11-doc libpython3.11-stdlib
    pip download --no-deps chatterbot-corpus==1.3.3 -d wheels
    python benchmarks/domain_texts.py OUT_DIR --conversation wheels/chatterbot_corpus-1.3.3-py2.py3-none-any.whl

writes OUT_DIR/KIND.txt for

  docs_train, docs   the Python 3.11 documentation split by document: every tenth held out (python_docs_text.py)
  lexicon            the Jargon File's prose paragraphs that are not in the shipped lexicon.txt
  literary           King James Bible narrative books that are not in the shipped narrative.txt
  code               Python 3.11 standard-library modules that are not in the shipped code.txt
  legal              the GPL-3, LGPL-3, Apache-2.0 and MPL-2.0 licence texts (/usr/share/common-licenses)
  conversation       the English dialogues of chatterbot-corpus 1.3.3 (PyPI, BSD-3-Clause), turns as "A:"/"B:"

The first four are other documents of the shipped corpus's sources (and of the docs-only training text);
legal and conversation are kinds of text that no corpus of ours has.
"""

from __future__ import annotations

import argparse
import re
import sys
import zipfile
from pathlib import Path

from python_docs_text import plain_text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))  # the shipped corpus's builder reads the same sources
from build_calibration_corpus import lexicon as jargon_prose, narrative, paragraphs  # noqa: E402

TEXTS = ROOT / "cqil_kernels" / "texts"
DOC_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
STDLIB = Path("/usr/lib/python3.11")
MODULES = ["argparse", "csv", "dataclasses", "functools", "json/decoder", "json/encoder", "pprint", "random",
           "tempfile", "zipfile", "ipaddress", "configparser", "enum", "contextlib", "shutil", "tokenize"]
BOOKS = ["Exodus 1:1-14:31", "Joshua 1:1-6:27", "Judges 13:1-16:31", "1Kings 17:1-19:21", "2Kings 4:1-5:27",
         "Mark 1:1-6:56", "John 9:1-11:57", "Acts 9:1-12:25"]
LICENCES = ["GPL-3", "LGPL-3", "Apache-2.0", "MPL-2.0"]


def lexicon() -> str:
    shipped = set(paragraphs((TEXTS / "lexicon.txt").read_text(), True))
    return "\n\n".join(p for p in jargon_prose() if p not in shipped) + "\n"


def literary() -> str:
    return "\n\n".join(narrative(BOOKS)) + "\n"


def code() -> str:
    return "\n\n".join((STDLIB / f"{m}.py").read_text() for m in MODULES)


def legal() -> str:
    return "\n\n".join(Path("/usr/share/common-licenses", name).read_text() for name in LICENCES)


def conversation(wheel: Path) -> str:
    import yaml

    dialogues = []
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(n for n in z.namelist() if re.search(r"/data/english/[^/]+\.yml$", n)):
            for turns in yaml.safe_load(z.read(name)).get("conversations") or []:
                turns = [" ".join(str(t).split()) for t in turns if isinstance(t, (str, int, float))]
                if len(turns) >= 2:
                    dialogues.append("\n".join(f"{'AB'[i % 2]}: {t}" for i, t in enumerate(turns)))
    return "\n\n".join(dialogues) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--conversation", type=Path, required=True, help="the chatterbot-corpus wheel")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    files = sorted(DOC_SOURCES.rglob("*.rst.txt"))
    docs = [plain_text(f.read_text(errors="replace")) for f in files]
    kinds = {"docs_train": "\n\n".join(d for i, d in enumerate(docs) if i % 10),
             "docs": "\n\n".join(d for i, d in enumerate(docs) if not i % 10),
             "lexicon": lexicon(), "literary": literary(), "code": code(), "legal": legal(),
             "conversation": conversation(a.conversation)}
    for kind, text in kinds.items():
        (a.out / f"{kind}.txt").write_text(text)
        print(f"{kind}: {len(text)} characters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
