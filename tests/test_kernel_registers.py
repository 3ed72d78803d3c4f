"""benchmarks/kernel_registers.py: the compiler's register and spill facts of the shipped configs, without a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_report_compiles_a_family_and_writes_a_table_record(tmp_path):
    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import tables
    finally:
        sys.path.pop(0)
    out = tmp_path / "registers.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_registers.py"), "--kernel", "rope_kv",
                           "--commit", "test", "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    if "unexpected keyword" in done.stderr or "has no attribute" in done.stderr:
        pytest.skip(f"this Triton's compiler takes other arguments: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    tables.check(record, out.name)
    assert [row[1] for row in record["rows"]] == ["llama-7b decode", "llama-7b prefill", "smollm2-135m decode",
                                                  "smollm2-135m prefill"]
    for _, _, _, registers, spill_stores, spill_loads, shared in record["rows"]:
        assert 0 < registers <= 255 and spill_stores >= 0 and spill_loads >= 0 and shared >= 0
