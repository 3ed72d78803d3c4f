"""Reading files a user may have been handed (checkpoints, adapters, configs, token files), safely.

Every loader of the package reads through here, so the rules hold everywhere:
* regular files only: a FIFO, a device or a socket named like a weight file would block a read forever
  or never end, so it is refused by name before anything opens it for reading;
* no format that can run code: JSON, safetensors, GGUF, and torch files only through the weights-only
  unpickler (`torch.load(weights_only=True)`), which builds tensors and containers and nothing else;
* bounded: a JSON file larger than MAX_JSON_BYTES is refused unread;
* every failure is a ValueError (or FileNotFoundError) that names the file, never an exception of the
  parsing library without the path.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import stat
from pathlib import Path
from typing import Any, Iterator

import torch

# Configs, adapter configs and shard indexes are a few KB; an index of a 400-layer model is ~100 KB.
MAX_JSON_BYTES = 16 << 20

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def regular_file(path, what: str = "file") -> Path:
    """`path` as a Path when it is an existing regular file (symbolic links followed); FileNotFoundError
    when it does not exist, ValueError naming what it is otherwise (a FIFO, a device, a directory)."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (the {what})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read the {what} ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path}: the {what} is {_kind(mode)}, not a regular file")
    return path


def is_regular_file(path) -> bool:
    """Whether `path` exists and is a regular file (a FIFO or device named like one is not)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def read_bytes(path, what: str = "file", max_bytes: int = MAX_JSON_BYTES) -> bytes:
    """The contents of a regular file of at most max_bytes. Opened without blocking and checked on the
    open descriptor, so a FIFO swapped in after a check cannot block the read."""
    path = regular_file(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ValueError(f"{path}: cannot open the {what} ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path}: the {what} is {_kind(st.st_mode)}, not a regular file")
        if st.st_size > max_bytes:
            raise ValueError(f"{path}: the {what} is {st.st_size} bytes, more than the {max_bytes} a {what} "
                             f"may have")
        data = f.read()
    if len(data) > max_bytes:
        raise ValueError(f"{path}: the {what} grew past {max_bytes} bytes while it was read")
    return data


def read_text(path, what: str = "text file", max_bytes: int | None = None) -> str:
    """A UTF-8 text file (regular, bounded when max_bytes is given); ValueError naming the file when it
    is not UTF-8."""
    data = read_bytes(path, what, max_bytes if max_bytes is not None else 1 << 40)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: the {what} is not UTF-8 text (byte {e.start})") from None


def read_json(path, what: str = "JSON file", expect: type = dict) -> Any:
    """A JSON file whose top level is an `expect` (dict by default). Regular file, at most
    MAX_JSON_BYTES, UTF-8; every failure is a ValueError naming the file."""
    text = read_text(path, what, MAX_JSON_BYTES)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the {what} is not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: the {what} is nested too deeply") from None
    if not isinstance(value, expect):
        raise ValueError(f"{path}: the {what} must hold a JSON {_json_type(expect)} at the top level, got "
                         f"{_json_type(type(value))}")
    return value


def _json_type(t: type) -> str:
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
             type(None): "null"}
    return names.get(t, t.__name__)


@contextlib.contextmanager
def _safetensors(path) -> Iterator[Any]:
    """safe_open of a regular file; a file safetensors cannot read is a ValueError naming it."""
    from safetensors import SafetensorError, safe_open

    path = regular_file(path, "safetensors file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def safetensors_shapes(path) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a safetensors file, from its header alone (no tensor data is read)."""
    with _safetensors(path) as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


def iter_safetensors(path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a safetensors file, one tensor at a time."""
    with _safetensors(path) as f:
        for key in f.keys():
            yield key, f.get_tensor(key)


def load_safetensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, with the file's metadata checked by the caller if needed."""
    return dict(iter_safetensors(path))


def safetensors_metadata(path) -> dict[str, str]:
    """The string metadata of a safetensors file's header."""
    with _safetensors(path) as f:
        return dict(f.metadata() or {})


def _weights_only_load(path, what: str, mmap: bool) -> Any:
    """torch.load with the weights-only unpickler: a pickle that would build anything but tensors and
    containers (and so could run code) is refused; every failure is a ValueError naming the file."""
    path = regular_file(path, what)
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused: the {what} holds objects other than tensors, which could run "
                         f"code when loaded ({str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable {what} ({str(e).splitlines()[0] if str(e) else e!r})") from None


def load_torch_tensors(path, what: str = "torch file", mmap: bool = True) -> dict[str, torch.Tensor]:
    """A `torch.save`d dict of tensors (pytorch_model.bin, adapter_model.bin), read with the weights-only
    unpickler."""
    state = _weights_only_load(path, what, mmap)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{path}: the {what} must hold a dict of named tensors, got {type(state).__name__}")
    return state


def load_token_tensor(path) -> torch.Tensor:
    """A `torch.save`d tensor of token ids (weights-only unpickler)."""
    ids = _weights_only_load(path, "token file", mmap=False)
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{path} holds a {type(ids).__name__}, not a tensor of token ids")
    return ids


def inside(directory: Path, name: str, what: str) -> Path:
    """directory / name, refused (ValueError) when `name` is absolute or leads outside `directory` (a
    shard index naming ../../etc/passwd or /dev/zero)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{directory}: {what} {name!r} is not a file name")
    candidate = Path(name)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise ValueError(f"{directory}: {what} {name!r} points outside the checkpoint directory")
    resolved = (directory / candidate).resolve()
    if not resolved.is_relative_to(directory.resolve()):
        raise ValueError(f"{directory}: {what} {name!r} points outside the checkpoint directory")
    return directory / candidate


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `path` so that a reader sees the old file or the new one, never a part: a file beside it,
    flushed, then renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def replace_directory(new, target) -> None:
    """Move the finished directory `new` to `target`, replacing what was there: two renames, so a reader
    sees the old directory, the new one, or (between them) none, never a mix. `new` and `target` must be
    on one filesystem (siblings are)."""
    new, target = Path(new), Path(target)
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
