"""benchmarks/attention_plans.py's CPU-checkable parts: a forced plan is what a prompt runs with and is put back
(decode keeps its own), and the loop writes a row per shape, length and plan (the timing needs a GPU)."""

import json

import pytest
import torch

from cqil_kernels.ops import attention
from cqil_kernels.reference.attention import group_attention_ref

from conftest import import_benchmark

attention_plans = import_benchmark("attention_plans")


def test_a_forced_plan_runs_a_prompt_and_is_put_back():
    shipped = attention._plan
    torch.manual_seed(0)
    op, make, nbytes, flops = attention_plans.prompt_inputs(dict(H=4, Hkv=2, Dh=16), 40, "cpu", torch.float32)
    q, k, v, valid, start, out = make()
    assert nbytes == 2 * (2 * 40 * 4 * 16 + 2 * 40 * 2 * 16) and flops == 2 * 40 * 40 * 4 * 16
    with attention_plans.forced_plan(32, 16, 8):
        assert attention._plan(1, 1, 2, 40, 2, 16, torch.float32, None)[:2] == (32, 16)
        assert attention._plan(1, 1, 2, 1, 2, 16, torch.float32, None) == shipped(1, 1, 2, 1, 2, 16, torch.float32,
                                                                                  None)  # decode: its own plan
        got = op(q, k, v, valid, start, out)
    assert attention._plan is shipped
    torch.testing.assert_close(got, group_attention_ref(q, k, v, valid, start), rtol=1e-5, atol=1e-5)


def test_the_loop_writes_a_row_per_shape_length_and_plan(monkeypatch, tmp_path):
    kernel_registers, replay = attention_plans.kernel_registers, attention_plans.replay
    tables = import_benchmark("tables")

    from cqil_kernels import bench

    monkeypatch.setitem(bench.SHAPES, "tiny", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                   head_dim=16, intermediate_size=64, vocab_size=32,
                                                   num_hidden_layers=2))
    monkeypatch.setattr(attention_plans, "DEVICE", "cpu")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "cpu (test)")
    ran = []
    monkeypatch.setattr(replay, "median_us", lambda op, make, nbytes, rounds: (ran.append(op(*make())), 5.0)[1])
    monkeypatch.setattr(kernel_registers, "compile_facts", lambda *a: dict(registers=100, spill_stores=0,
                                                                             spill_loads=0, shared_bytes=0))
    out = tmp_path / "plans.json"
    attention_plans.main(["--shape", "tiny", "--rows", "40", "--plan", "32,16,8", "--passes", "2",
                          "--out", str(out)])
    record = json.loads(out.read_text())
    tables.check(record, out.name)
    assert len(ran) == 4 and [row[3] for row in record["rows"]] == [True, False]
    assert record["rows"][1][2] == "32x16 w8" and record["rows"][1][6] == [5.0, 5.0]


def test_plan_arguments_are_parsed_and_refused():
    assert attention_plans.parse_plan("64,64,8") == (64, 64, 8)
    with pytest.raises(Exception, match="BLOCK_M,BLOCK_N,warps"):
        attention_plans.parse_plan("64,64")
