"""The calibration corpus shipped with the package: what `cqil calibrate` and `cqil eval` measure on when
no --text is given.

Four kinds of text (texts/manifest.json states each one's source and licence; texts/README.md the
licence notices; python/build_calibration_corpus.py rebuilds them from Debian packages):

  lexicon    prose of the Jargon File 4.4.7                         public domain
  narrative  narrative chapters of the King James Bible             public domain
  docs       the Python 3.11 tutorial (reStructuredText)            PSF License 2
  code       Python 3.11 standard-library modules                   PSF License 2

`training_ids(model_src)` is all of it, the default training text of `cqil finetune`;
`calibration_ids(model_src, window)` returns the same number of windows from each kind, spread evenly over
it, laid end to end so that windows of `window` tokens (stride = window) are exactly those. Why these sizes:
docs/performance.md ("How many windows"), from benchmarks/calibration_windows.py.

Each kind is tokenized once per tokenizer and cached (CQIL_CACHE_DIR, default ~/.cache/cqil_kernels): a
safetensors file written whole or not at all; a cache file that does not read back is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from . import envs

TEXTS = Path(__file__).parent / "texts"
KINDS = ("lexicon", "narrative", "docs", "code")
DEFAULT_TOKENS = 16384  # tokens of the corpus a calibration scores by default (all kinds together)


def _error(message: str) -> ValueError:
    return ValueError(f"the shipped calibration corpus ({TEXTS}): {message}; reinstall cqil_kernels, or pass "
                      f"your own text (--text)")


def manifest() -> dict[str, dict]:
    """texts/manifest.json, checked: one entry per kind with its file, sha256, source and licence."""
    from .files import read_json

    try:
        entries = read_json(TEXTS / "manifest.json", "corpus manifest")
    except (OSError, ValueError) as e:
        raise _error(f"manifest.json does not read ({e})") from None
    for kind in KINDS:
        entry = entries.get(kind)
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in
                                                  ("file", "sha256", "source", "licence")):
            raise _error(f"manifest.json has no valid entry for {kind!r}")
    return entries


def texts(entries: dict[str, dict] | None = None) -> dict[str, str]:
    """{kind: text}, each checked against the sha256 of the manifest (`entries`, read if not given)."""
    from .files import read_bytes

    entries = entries if entries is not None else manifest()
    out = {}
    for kind in KINDS:
        path = TEXTS / Path(entries[kind]["file"]).name
        try:
            data = read_bytes(path, "corpus file", max_bytes=16 << 20)
        except (OSError, ValueError) as e:
            raise _error(f"{path.name} does not read ({e})") from None
        if hashlib.sha256(data).hexdigest() != entries[kind]["sha256"]:
            raise _error(f"{path.name} is not the file shipped (its sha256 differs from manifest.json)")
        out[kind] = data.decode("utf-8")
    return out


def _tokenizer_key(model_src) -> str:
    """What identifies a tokenizer without loading it: the contents of a model directory's tokenizer files,
    or a .gguf file's resolved path, size and modification time (hashing gigabytes would cost more than
    tokenizing)."""
    from .quality import TOKENIZER_FILES

    src = Path(model_src)
    h = hashlib.sha256()
    if src.suffix == ".gguf":
        st = src.stat()
        h.update(f"gguf {src.resolve()} {st.st_size} {st.st_mtime_ns}".encode())
    else:
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                h.update(name.encode() + b"\0" + (src / name).read_bytes() + b"\0")
    return h.hexdigest()


def token_ids(model_src) -> dict[str, torch.Tensor]:
    """{kind: [tokens] int64 ids} of every kind under the tokenizer of `model_src`, from the cache when it
    holds them (tokenized once per tokenizer and corpus)."""
    from safetensors.torch import save

    from .files import atomic_write_bytes, load_safetensors
    from .quality import load_tokenizer

    entries = manifest()
    key = hashlib.sha256((_tokenizer_key(model_src) + "".join(entries[k]["sha256"] for k in KINDS)).encode())
    path = envs.cache_dir() / f"corpus-{key.hexdigest()[:24]}.safetensors"
    if path.is_file():
        try:
            cached = load_safetensors(path)
            if sorted(cached) == sorted(KINDS) and all(t.dim() == 1 and t.numel() > 0 and not
                                                       t.dtype.is_floating_point for t in cached.values()):
                return {k: cached[k].long() for k in KINDS}
        except Exception:  # a damaged cache is rebuilt, never trusted
            pass
        print(f"cqil_kernels: the cached corpus tokens {path} do not read back; tokenizing again", file=sys.stderr)
    corpus, tokenizer = texts(entries), load_tokenizer(model_src)
    ids = {k: torch.tensor(tokenizer(corpus[k]).input_ids, dtype=torch.long) for k in KINDS}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        dtype = torch.int32 if max(int(t.max()) for t in ids.values()) < 2**31 else torch.int64
        atomic_write_bytes(path, save({k: t.to(dtype).contiguous() for k, t in ids.items()},
                                      metadata={"source": str(model_src), "kinds": json.dumps(KINDS)}))
    except OSError as e:  # a read-only home still calibrates, only slower next time
        print(f"cqil_kernels: not caching the corpus tokens ({e})", file=sys.stderr)
    return ids


def spread_windows(ids: torch.Tensor, count: int, window: int) -> torch.Tensor:
    """`count` windows of `window` tokens of `ids`, starting at evenly spaced places (the first at the
    start, the last at the end), laid end to end: [count * window]."""
    n = ids.numel()
    if count < 1 or window < 2:
        raise ValueError(f"need count >= 1 and window >= 2, got {count}, {window}")
    if count * window > n:
        raise ValueError(f"{count} windows of {window} tokens need {count * window} tokens, the text has {n}")
    starts = [i * (n - window) // max(1, count - 1) for i in range(count)]
    return torch.cat([ids[s:s + window] for s in starts])


def calibration_ids(model_src, window: int = 512, tokens: int = DEFAULT_TOKENS) -> torch.Tensor:
    """About `tokens` ids of the corpus for windows of `window`: the same number of windows from each kind
    (at least 2, so that 8 windows are there for the bootstrap), spread over it, laid end to end."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be an int >= 2, got {window!r}")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be a positive int, got {tokens!r}")
    per_kind = max(2, tokens // (window * len(KINDS)))
    ids = token_ids(model_src)
    kind = min(KINDS, key=lambda k: ids[k].numel())
    shortest = ids[kind].numel()
    if shortest < 2 * window:
        raise ValueError(f"the shipped {kind} text has {shortest} tokens under this tokenizer, fewer than 2 "
                         f"windows of {window}: use a window of at most {shortest // 2} tokens, or your own text "
                         f"(--text)")
    if shortest < per_kind * window:
        most = len(KINDS) * window * (shortest // window)
        raise ValueError(f"the shipped corpus gives at most {most} tokens in windows of {window} under this "
                         f"tokenizer ({kind} has {shortest}), not {tokens}: ask for fewer (--corpus-tokens) or "
                         f"pass your own text (--text)")
    return torch.cat([spread_windows(ids[kind], per_kind, window) for kind in KINDS])


def training_ids(model_src) -> torch.Tensor:
    """Every token of the corpus, the kinds one after another: what `cqil finetune` distils on when no
    --text is given (training draws windows anywhere in it, so every batch mixes kinds)."""
    ids = token_ids(model_src)
    return torch.cat([ids[kind] for kind in KINDS])
