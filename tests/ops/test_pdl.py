"""ops/_pdl.py's contract, read in the code the compiler makes for Hopper (sm_90), on any machine.

A kernel launched with programmatic dependent launch may start while the kernel before it still runs, so
it must not touch memory before griddepcontrol.wait; and it must release its own dependents
(griddepcontrol.launch_dependents) only after that wait, which is what makes everything two launches back
complete when a kernel starts. The one declared exception: decode attention called with keys_before_wait
loads (never stores) before its wait. A race of this kind shows on a GPU only now and then; the order of
the instructions shows it always. Each case is compiled to PTX in a subprocess without TRITON_INTERPRET,
with Triton's bundled NVIDIA toolchain (no GPU needed). The order of loads and stores also tells whether a
kernel's loads go out together (test_loads_all_come_before_the_first_store).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import import_benchmark

# the compile and the pointer types of attention's and rope_kv's launches: benchmarks/kernel_registers.py's
KERNEL_REGISTERS = import_benchmark("kernel_registers")
ROPE_POINTERS, ATTENTION_POINTERS = KERNEL_REGISTERS.ROPE_POINTERS, KERNEL_REGISTERS.ATTENTION_POINTERS
# kernel (module, name), the constexprs that pick its variant, pointer types other than bf16
CASES = {
    "gemm-decode-norm": ("group_gemm", "_group_gemm_kernel", dict(
        NORM=True, SWIGLU=False, SUM_P=False, HAS_BIAS=True, HAS_RES=False, UPCAST=False, DOT_PRECISION="tf32",
        BLOCK_M=16, BLOCK_N=32, BLOCK_K=128), {}),
    "gemm-decode-swiglu": ("group_gemm", "_group_gemm_kernel", dict(
        NORM=True, SWIGLU=True, SUM_P=False, HAS_BIAS=False, HAS_RES=False, UPCAST=False, DOT_PRECISION="tf32",
        BLOCK_M=16, BLOCK_N=32, BLOCK_K=128), {}),
    "gemm-prefill-sum-p": ("group_gemm", "_group_gemm_kernel", dict(
        NORM=False, SWIGLU=False, SUM_P=True, HAS_BIAS=False, HAS_RES=True, UPCAST=False, DOT_PRECISION="tf32",
        BLOCK_M=64, BLOCK_N=64, BLOCK_K=64), {}),
    "gemm-decode-residual": ("group_gemm", "_group_gemm_kernel", dict(
        NORM=False, SWIGLU=False, SUM_P=False, HAS_BIAS=False, HAS_RES=True, UPCAST=False, DOT_PRECISION="tf32",
        BLOCK_M=16, BLOCK_N=32, BLOCK_K=128), {}),
    "sum-p": ("group_gemm", "_sum_p_kernel", dict(P=4, HAS_RES=True, BLOCK=1024), {"part_ptr": "*fp32"}),
    "silu-mul": ("group_gemm", "_silu_mul_kernel", dict(BLOCK=1024), {}),
    "attention-decode-early": ("attention", "_attention_kernel", dict(
        HEAD_DIM=128, BLOCK_D=128, BLOCK_M=16, BLOCK_N=32, SPLIT=True, MERGE_HERE=True, UPCAST=False,
        DOT_PRECISION="tf32", SPLIT_CHUNK=8, ROWS_P2=1, EARLY_KEYS=True), None),
    "attention-decode": ("attention", "_attention_kernel", dict(
        HEAD_DIM=128, BLOCK_D=128, BLOCK_M=16, BLOCK_N=32, SPLIT=True, MERGE_HERE=True, UPCAST=False,
        DOT_PRECISION="tf32", SPLIT_CHUNK=8, ROWS_P2=1, EARLY_KEYS=False), None),
    "attention-prefill": ("attention", "_attention_kernel", dict(
        HEAD_DIM=64, BLOCK_D=64, BLOCK_M=64, BLOCK_N=64, SPLIT=False, MERGE_HERE=False, UPCAST=False,
        DOT_PRECISION="tf32", SPLIT_CHUNK=1, ROWS_P2=1, EARLY_KEYS=False), None),
    "attention-merge": ("attention", "_merge_kernel", dict(
        HEAD_DIM=128, BLOCK_D=128, BLOCK_M=16, SPLIT_CHUNK=8, ROWS_P2=4), {"part_ptr": "*fp32", "stat_ptr": "*fp32"}),
    "rope-kv-decode": ("rope_kv", "_rope_kv_kernel", dict(
        HEAD_DIM=128, HALF_BLOCK=64, HEAD_BLOCK=64, RELEASE_AT_ONCE=True), ROPE_POINTERS),
    "rope-kv-prefill": ("rope_kv", "_rope_kv_kernel", dict(
        HEAD_DIM=128, HALF_BLOCK=64, HEAD_BLOCK=64, RELEASE_AT_ONCE=False), ROPE_POINTERS),
    "argmax": ("argmax", "_argmax_kernel", dict(BLOCK=4096, CHUNKS_BLOCK=16),
               {"key_ptr": "*i32", "idx_ptr": "*i32", "ticket_ptr": "*i32", "out_ptr": "*i64"}),
    "cache-advance": ("cache_advance", "_cache_advance_kernel", dict(HAS_VALID=True, BLOCK_B=16, BLOCK_T=64),
                      {"valid_ptr": "*u8", "key_valid_ptr": "*u8", "n_tokens_ptr": "*i64", "position_ptr": "*i32",
                       "start_ptr": "*i32", "pos_ptr": "*i64"}),
    "group-residual": ("group_residual", "_group_residual_kernel", dict(
        RESIDUAL_MODE=True, HAS_RECV=False, INCLUDE_H=True, BLOCK_D=1024, BLOCK_P=4, TILED=True), {"res_ptr": "*fp32"}),
    "rank-residual": ("group_residual", "_group_residual_kernel", dict(
        RESIDUAL_MODE=True, HAS_RECV=True, INCLUDE_H=False, BLOCK_D=1024, BLOCK_P=1, TILED=True), {"res_ptr": "*fp32"}),
    "residual-by-layer": ("group_residual", "_group_residual_kernel", dict(  # groups too large for one tile
        RESIDUAL_MODE=True, HAS_RECV=False, INCLUDE_H=True, BLOCK_D=4096, BLOCK_P=1, TILED=False),
        {"res_ptr": "*fp32"}),
    "rms-norm": ("rms_norm", "_rms_norm_kernel", dict(BLOCK_D=1024), {}),
}
EARLY_LOADS = {"attention-decode-early"}  # loads before the wait, declared and argued in ops/attention.py

_COMPILE = textwrap.dedent(r"""
    import json, re, sys
    sys.path.insert(0, sys.argv[2])  # benchmarks/
    from kernel_registers import compile_sm90

    MEMORY = ("ld.global", "st.global", "atom.global", "red.global", "cp.async")
    result = {}
    for name, (module, kernel, constexprs, pointers) in json.loads(sys.argv[1]).items():
        try:  # a kernel that does not compile still fails
            ptx = compile_sm90(module, kernel, constexprs, pointers).asm["ptx"]
        except (TypeError, KeyError, AttributeError) as e:  # another Triton's API
            print(json.dumps(dict(unsupported=f"{type(e).__name__}: {e}")))
            sys.exit(0)
        wait = ptx.find("griddepcontrol.wait")
        release = ptx.find("griddepcontrol.launch_dependents")
        before = ptx[:wait] if wait >= 0 else ptx
        first_store = ptx.find("st.global")
        # loops: a branch back to a label above it; the code from the label to the branch is the loop's body
        labels = {m.group(1): m.start() for m in re.finditer(r"^(\$L__\w+):", ptx, re.M)}
        loops = [(labels[m.group(1)], m.start()) for m in re.finditer(r"\bbra(?:\.uni)?\s+(\$L__\w+);", ptx)
                 if labels.get(m.group(1), len(ptx)) < m.start()]
        loops_end = max((end for _, end in loops), default=0)
        result[name] = dict(waits=wait >= 0, release_after_wait=release < 0 or release > wait,
                            before_wait={op: before.count(op) for op in MEMORY},
                            loads_after_a_store=ptx[first_store:].count("ld.global") if first_store >= 0 else 0,
                            loads_in_loops=sum(ptx[lo:hi].count("ld.global") for lo, hi in loops),
                            loads_after_loops=ptx[loops_end:].count("ld.global") if loops else None)
    print(json.dumps(result))
""")


@pytest.fixture(scope="module")
def compiled():
    """Each case's PTX facts, compiled in one subprocess (about 20 s)."""
    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
    cases = {name: (module, kernel, constexprs, ATTENTION_POINTERS if pointers is None else pointers)
             for name, (module, kernel, constexprs, pointers) in CASES.items()}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    benchmarks = os.path.dirname(KERNEL_REGISTERS.__file__)
    done = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(cases), benchmarks], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    if "unsupported" in facts:
        pytest.skip(f"this Triton's compiler takes other arguments: {facts['unsupported']}")
    return facts


@pytest.mark.parametrize("case", CASES)
def test_no_memory_access_before_the_dependent_launch_wait(compiled, case):
    facts = compiled[case]
    assert facts["waits"], f"{case}: no griddepcontrol.wait with USE_GDC"
    before = facts["before_wait"]
    assert before["st.global"] == before["atom.global"] == before["red.global"] == 0, (case, before)
    if case in EARLY_LOADS:
        assert before["ld.global"] > 0, f"{case}: the declared early loads are gone ({before})"
    else:
        assert before["ld.global"] == before["cp.async"] == 0, (case, before)


@pytest.mark.parametrize("case", CASES)
def test_dependents_are_released_only_after_the_wait(compiled, case):
    assert compiled[case]["release_after_wait"], case


@pytest.mark.parametrize("case", [case for case in CASES if case.startswith(("rope-kv", "group-residual",
                                                                              "rank-residual"))])
def test_loads_all_come_before_the_first_store(compiled, case):
    """The compiler keeps a load after a store that may alias it, and the store waits for its value's loads: in
    rope_kv and group_residual the loads all come first, so they go out together, one round trip to memory."""
    assert compiled[case]["loads_after_a_store"] == 0, case


def test_decode_gemm_loads_its_residual_before_the_k_loop(compiled):
    """A decode tile's residual load after the K loop was one more round trip between the last product and the
    store, at every program's tail (group_gemm.py, EARLY_RES)."""
    facts = compiled["gemm-decode-residual"]
    assert facts["loads_after_loops"] == 0, facts


def test_sum_of_parts_loads_all_parts_at_once(compiled):
    """_sum_p_kernel's loop over the parts is unrolled (P constexpr): no load waits inside a loop."""
    facts = compiled["sum-p"]
    assert facts["loads_in_loops"] == 0 and facts["loads_after_a_store"] == 0, facts
