"""benchmarks/attention_plans.py's parts that need no timing, on the GPU where there is one (else in the
interpreter): a forced plan is what a prompt runs with and is put back (decode keeps its own), and the loop writes
a row per shape, length and plan."""

import json

import pytest
import torch

from cqil_kernels.ops import attention
from cqil_kernels.reference.attention import group_attention_ref

from conftest import import_benchmark

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

attention_plans = import_benchmark("attention_plans")


def test_a_forced_plan_runs_a_prompt_and_is_put_back():
    shipped = attention._plan
    torch.manual_seed(0)
    op, make, nbytes, flops = attention_plans.prompt_inputs(dict(H=4, Hkv=2, Dh=16), 40, DEVICE, torch.float32)
    q, k, v, valid, start, out = make()
    assert nbytes == 2 * (2 * 40 * 4 * 16 + 2 * 40 * 2 * 16) and flops == 2 * 40 * 40 * 4 * 16
    with attention_plans.forced_plan(32, 16, 8):
        assert attention._plan(1, 1, 2, 40, 2, 16, torch.float32, None)[:2] == (32, 16)
        assert attention._plan(1, 1, 2, 1, 2, 16, torch.float32, None) == shipped(1, 1, 2, 1, 2, 16, torch.float32,
                                                                                  None)  # decode: its own plan
        got = op(q, k, v, valid, start, out)
    assert attention._plan is shipped
    torch.testing.assert_close(got, group_attention_ref(q, k, v, valid, start), rtol=1e-5, atol=1e-5)


def test_the_loop_writes_a_row_per_shape_length_and_plan(sweep_untimed, monkeypatch, tmp_path):
    """main's loop untimed (sweep_untimed: the timing and the compiler's facts replaced, a tiny shape)."""
    monkeypatch.setattr(attention_plans, "DEVICE", DEVICE)
    out = tmp_path / "plans.json"
    attention_plans.main(["--shape", "tiny", "--rows", "40", "--plan", "32,16,8", "--passes", "2",
                          "--out", str(out)])
    record = json.loads(out.read_text())
    import_benchmark("tables").check(record, out.name)
    assert len(sweep_untimed) == 4 and [row[3] for row in record["rows"]] == [True, False]
    assert record["rows"][1][2] == "32x16 w8" and record["rows"][1][6] == [7.0, 7.0]


def test_plan_arguments_are_parsed_and_refused():
    assert attention_plans.parse_plan("64,64,8") == (64, 64, 8)
    with pytest.raises(Exception, match="BLOCK_M,BLOCK_N,warps"):
        attention_plans.parse_plan("64,64")
