"""envs.py: every environment variable in one registry, parsed once, bad values named."""

import subprocess
import sys

import pytest

from cqil_kernels import envs

from conftest import interpreter


def test_every_variable_the_package_reads_is_registered():
    """No module reads a CQIL_ variable behind the registry's back (setup.py's build variables aside)."""
    import pathlib
    import re

    package = pathlib.Path(envs.__file__).parent
    read = set()
    for path in package.rglob("*.py"):
        if path.name == "envs.py":
            continue
        read |= set(re.findall(r"os\.environ(?:\.get)?[\[(]\s*['\"](CQIL_\w+)", path.read_text()))
    assert read == set(), f"read outside envs.py: {sorted(read)}"
    assert set(envs.VARIABLES).isdisjoint(envs.BUILD_VARIABLES)


@pytest.mark.parametrize("name, text, value", [
    ("CQIL_PDL", "", True), ("CQIL_PDL", "0", False), ("CQIL_PDL", "1", True),
    ("CQIL_AUTOTUNE", "0", False), ("CQIL_PREFILL_BLAS_ROWS", "", None), ("CQIL_PREFILL_BLAS_ROWS", "auto", None),
    ("CQIL_PREFILL_BLAS_ROWS", "0", 0), ("CQIL_PREFILL_BLAS_ROWS", "512", 512), ("CQIL_COMMIT", "abc", "abc"),
])
def test_values_parse(name, text, value):
    assert envs.parse(name, text) == value


@pytest.mark.parametrize("name, text", [
    ("CQIL_PDL", "true"), ("CQIL_PDL", "on"), ("CQIL_PDL", "2"), ("CQIL_PDL", " 1"), ("CQIL_AUTOTUNE", "yes"),
    ("CQIL_PREFILL_BLAS_ROWS", "many"), ("CQIL_PREFILL_BLAS_ROWS", "-1"), ("CQIL_PREFILL_BLAS_ROWS", "1.5"),
])
def test_bad_values_name_the_variable(name, text):
    with pytest.raises(ValueError, match=name):
        envs.parse(name, text)


def test_read_once_and_overridden_for_a_block():
    before = envs.get("CQIL_PDL")
    with envs.overridden(CQIL_PDL=not before):
        assert envs.CQIL_PDL is (not before)
    assert envs.CQIL_PDL is before
    with pytest.raises(KeyError, match="not a cqil_kernels variable"):
        envs.get("CQIL_NOPE")
    with pytest.raises(KeyError):
        with envs.overridden(CQIL_NOPE=1):
            pass
    assert "CQIL_PREFILL_BLAS_ROWS" in envs.describe()


@interpreter
def test_a_bad_value_fails_the_first_step_that_reads_it():
    script = ("import torch\nfrom cqil_kernels import CQILConfig, CQILLlama, LlamaArgs\n"
              "m = CQILLlama(LlamaArgs(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=2,"
              " num_attention_heads=2, num_key_value_heads=2, head_dim=8))\nm.backend = 'triton'\n"
              "m(torch.zeros(1, 3, dtype=torch.long))\n")
    env = {"CQIL_PREFILL_BLAS_ROWS": "lots", "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "",
           "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, **env})
    assert out.returncode != 0 and "CQIL_PREFILL_BLAS_ROWS must be 'auto' or a whole number" in out.stderr
