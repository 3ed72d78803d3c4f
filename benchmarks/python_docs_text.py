"""English training and held-out text for `cqil finetune` runs, from the Python documentation.

Model hubs and dataset hubs are out of reach here, package registries are not: Debian's
python3.11-doc package ships the reStructuredText sources of the Python 3.11 documentation (PSF
licence), a few million words of technical English prose with code. This turns them into plain text
and splits them by document, so no held-out document is seen in training:

    apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb docs
    python benchmarks/python_docs_text.py docs/usr/share/doc/python3.11/html/_sources OUT_DIR

writes OUT_DIR/train.txt and OUT_DIR/held_out.txt (every tenth document, in path order, is held out).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

ROLE = re.compile(r":[a-z:+-]+:`(?:~|!)?([^`<]*?)\s*(?:<[^`>]*>)?`")  # :func:`len` -> len, :ref:`t <x>` -> t
LITERAL = re.compile(r"``([^`]+)``")
LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`_+")
UNDERLINE = re.compile(r"^\s*([=\-~^\"'*+#`.:])\1{2,}\s*$")
DIRECTIVE = re.compile(r"^\s*\.\. ")
OPTION = re.compile(r"^\s+:[a-zA-Z -]+:")


def plain_text(rst: str) -> str:
    """Sphinx reST → readable text: roles and literals keep their text, headings keep their title,
    directive and comment lines go (their indented bodies stay), tables' rules go."""
    lines = []
    for line in rst.splitlines():
        if UNDERLINE.match(line) or DIRECTIVE.match(line) or OPTION.match(line):
            continue
        line = ROLE.sub(r"\1", line)
        line = LINK.sub(r"\1", line)
        line = LITERAL.sub(r"\1", line)
        lines.append(line.rstrip())
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sources", type=Path, help="the _sources directory of the HTML documentation")
    p.add_argument("out", type=Path)
    p.add_argument("--hold-out-every", type=int, default=10)
    args = p.parse_args(argv)
    files = sorted(args.sources.rglob("*.rst.txt"))
    if not files:
        raise SystemExit(f"no *.rst.txt files under {args.sources}")
    train, held = [], []
    for i, path in enumerate(files):
        (held if i % args.hold_out_every == 0 else train).append(plain_text(path.read_text(errors="replace")))
    args.out.mkdir(parents=True, exist_ok=True)
    for name, docs in (("train.txt", train), ("held_out.txt", held)):
        text = "\n\n".join(docs)
        (args.out / name).write_text(text)
        print(f"{args.out / name}: {len(docs)} documents, {len(text.split())} words, {len(text) / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
