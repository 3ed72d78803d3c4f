"""What the compiler makes of our kernels' shipped configs for Hopper (sm_90a), on any machine: registers per
thread, bytes spilled to local memory and shared memory, per kernel, variant and config. No GPU: each kernel
is compiled with Triton's compiler and its bundled ptxas (-v), as tests/ops/test_pdl.py compiles them.

    python benchmarks/kernel_registers.py --out benchmarks/results/kernel_registers_sm90_<commit>.json

Covered: the group GEMM's every autotuner candidate (TUNED_DECODE, TUNED_BATCH, TUNED_PREFILL) in each
launch form the step uses (QKV with the norm, o_proj with the residual, gate/up with the norm and SwiGLU,
the down projection as decode partials and as a prompt's sum over P), and the configs that attention
(ops/attention.py's _plan, planned for an H100's 132 multiprocessors), rope_kv and group_residual pick for
the LLaMA-7B and SmolLM2 shapes. A spill is a round trip to local memory (L1, else L2) inside a kernel that
otherwise streams: the first place to look when a config is slower than its bytes say. Registers and
spills are the compiler's facts, not timings; Triton's and ptxas' versions are in the record.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {  # hidden D, heads H, kv heads Hkv, head dim Dh
    "llama-7b": dict(D=4096, H=32, Hkv=32, Dh=128),
    "smollm2-135m": dict(D=576, H=9, Hkv=3, Dh=64),
}
H100_SMS = 132
GEMM_FORMS = {  # launch form -> (constexprs, pointer types other than bf16)
    "qkv (norm)": (dict(NORM=True, SWIGLU=False, SUM_P=False, HAS_BIAS=False, HAS_RES=False), {}),
    "o_proj (+residual)": (dict(NORM=False, SWIGLU=False, SUM_P=False, HAS_BIAS=False, HAS_RES=True), {}),
    "gate/up (norm, swiglu)": (dict(NORM=True, SWIGLU=True, SUM_P=False, HAS_BIAS=False, HAS_RES=False), {}),
    "down partials (fp32 out)": (dict(NORM=False, SWIGLU=False, SUM_P=False, HAS_BIAS=False, HAS_RES=False),
                                 {"out_ptr": "*fp32"}),
    "down sum over P (+residual)": (dict(NORM=False, SWIGLU=False, SUM_P=True, HAS_BIAS=False, HAS_RES=True),
                                    {"res_ptr": "*fp32"}),
}
ATTENTION_POINTERS = {"valid_ptr": "*u8", "start_ptr": "*i32", "part_ptr": "*fp32", "stat_ptr": "*fp32",
                      "ticket_ptr": "*i32"}
ROPE_POINTERS = {"pos_ptr": "*i64", "inv_freq_ptr": "*fp32", "start_ptr": "*i32"}
FLOAT_SCALARS = ("eps", "sm_scale_log2")


def _ptxas() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def compile_sm90(module: str, kernel: str, constexprs: dict, pointers: dict, warps: int = 4, stages: int = 3):
    """cqil_kernels.ops.<module>.<kernel> compiled for sm_90 (no GPU; run without TRITON_INTERPRET) with these
    constexprs (USE_GDC on), its pointers bf16 except those in `pointers`, eps and sm_scale_log2 fp32, other
    arguments int32. Triton's compiled kernel (.asm, .metadata). Written against Triton 3.6-3.9's compiler API:
    tests/ops/test_pdl.py compiles its cases here too."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = getattr(importlib.import_module("cqil_kernels.ops." + module), kernel)
    while not isinstance(fn, JITFunction):  # the autotuned GEMM's JIT function
        fn = fn.fn
    constexprs = dict(constexprs, USE_GDC=True)
    signature = {arg: "constexpr" if arg in constexprs else pointers.get(arg, "*bf16") if arg.endswith("_ptr")
                 else "fp32" if arg in FLOAT_SCALARS else "i32" for arg in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton_compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))


def compile_facts(module: str, kernel: str, constexprs: dict, pointers: dict, warps: int, stages: int) -> dict:
    """Registers, spill bytes and shared memory of one kernel variant compiled for sm_90a."""
    compiled = compile_sm90(module, kernel, constexprs, pointers, warps, stages)
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(2):
            (Path(tmp) / "k.ptx").write_text(ptx)
            done = subprocess.run([str(_ptxas()), "-arch=sm_90a", "-v", "k.ptx", "-o", "k.cubin"], cwd=tmp,
                                  capture_output=True, text=True, timeout=300)
            newest = re.search(r"Unsupported \.version \S+; current version is '([\d.]+)'", done.stderr)
            if not newest:
                break
            # Triton may write a PTX version newer than its bundled ptxas reads (the code needs none of it)
            ptx = re.sub(r"\.version \d+\.\d+", ".version " + newest.group(1), ptx)
    if done.returncode:
        raise RuntimeError(f"ptxas failed for {kernel} {constexprs}: {done.stderr[-500:]}")
    registers = re.search(r"Used (\d+) registers", done.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", done.stderr)
    return dict(registers=int(registers.group(1)), spill_stores=int(spills.group(1)),
                spill_loads=int(spills.group(2)), shared_bytes=int(compiled.metadata.shared))


def attention_constexprs(head_dim: int, block_m: int, block_n: int, split: bool, SPLIT_CHUNK: int = 1,
                         ROWS_P2: int = 1) -> dict:
    """The attention kernel's constexprs for a tile plan (bf16): decode's split form, merged in the launch and with
    its first key tile before the wait, or a prompt's."""
    from cqil_kernels.ops.attention import _block_d

    return dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=block_m, BLOCK_N=block_n, SPLIT=split,
                MERGE_HERE=split, UPCAST=False, DOT_PRECISION="tf32", SPLIT_CHUNK=SPLIT_CHUNK, ROWS_P2=ROWS_P2,
                EARLY_KEYS=split)


def cases() -> list[tuple]:
    """(kernel family, variant, config text, module, kernel, constexprs, pointers, warps, stages) of every report
    row."""
    import torch

    from cqil_kernels.ops import attention, group_gemm, group_residual, rope_kv

    rows = []
    for table, configs in (("decode", group_gemm.TUNED_DECODE), ("batch", group_gemm.TUNED_BATCH),
                           ("prefill", group_gemm.TUNED_PREFILL)):
        for form, (flags, pointers) in GEMM_FORMS.items():
            if form.startswith("down") and form.startswith("down partials") != (table == "decode"):
                continue  # decode (<= 16 rows) takes the down projection as partials, more rows as one sum
            for bm, bn, bk, warps, stages in configs:
                rows.append(("group_gemm", f"{form}, {table}", f"{bm}x{bn}x{bk} w{warps} s{stages}", "group_gemm",
                             "_group_gemm_kernel", dict(flags, UPCAST=False, DOT_PRECISION="tf32", BLOCK_M=bm,
                                                        BLOCK_N=bn, BLOCK_K=bk), pointers, warps, stages))
    for shape, s in SHAPES.items():
        G = s["H"] // s["Hkv"]
        for T, what in ((1, "decode"), (512, "prefill 512"), (2048, "prefill 2048")):
            block_m, block_n, splits, warps = attention._plan(1, 1, s["Hkv"], T, G, s["Dh"], torch.bfloat16, None,
                                                              sms=H100_SMS)
            split = splits > 1 and T * G <= block_m
            merge = attention._merge_tile(T * G, block_m, splits if split else 1, attention._block_d(s["Dh"]))
            rows.append(("attention", f"{shape} {what}", f"{block_m}x{block_n} w{warps} s3", "attention",
                         "_attention_kernel", attention_constexprs(s["Dh"], block_m, block_n, split, **merge),
                         ATTENTION_POINTERS, warps, 3))
        tiles = rope_kv._tiles(s["H"], s["Hkv"], s["Dh"])
        warps = tiles.pop("num_warps")
        for release, what in ((True, "decode"), (False, "prefill")):
            rows.append(("rope_kv", f"{shape} {what}", f"w{warps}", "rope_kv", "_rope_kv_kernel",
                         dict(HEAD_DIM=s["Dh"], RELEASE_AT_ONCE=release, **tiles), ROPE_POINTERS, warps, 3))
        for P in (2, 4, 8):
            plan = group_residual._plan(s["D"], P)
            warps = plan.pop("num_warps")
            rows.append(("group_residual", f"{shape} P {P}", f"{'tile' if plan['TILED'] else 'by layer'} w{warps}",
                         "group_residual", "_group_residual_kernel",
                         dict(RESIDUAL_MODE=True, HAS_RECV=False, INCLUDE_H=True, **plan), {"res_ptr": "*fp32"}, warps,
                         3))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the record (JSON) here")
    parser.add_argument("--commit", default=os.environ.get("CQIL_COMMIT", "unknown"), help="the commit compiled")
    parser.add_argument("--kernel", action="append", choices=["group_gemm", "attention", "rope_kv", "group_residual"],
                        help="only these kernel families (repeatable; default all)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run without TRITON_INTERPRET: the kernels must be compiled, not interpreted")
    import triton

    version = subprocess.run([str(_ptxas()), "--version"], capture_output=True, text=True).stdout.strip()
    rows = []
    print(f"{'kernel':15} {'variant':34} {'config':22} {'regs':>5} {'spill st/ld':>12} {'smem':>7}")
    for family, variant, config, module, kernel, constexprs, pointers, warps, stages in cases():
        if args.kernel and family not in args.kernel:
            continue
        facts = compile_facts(module, kernel, constexprs, pointers, warps, stages)
        spill = f"{facts['spill_stores']}/{facts['spill_loads']}" if facts["spill_stores"] else "-"
        print(f"{family:15} {variant:34} {config:22} {facts['registers']:>5} {spill:>12} {facts['shared_bytes']:>7}",
              flush=True)
        rows.append([family, variant, config, facts["registers"], facts["spill_stores"], facts["spill_loads"],
                     facts["shared_bytes"]])
    if args.out:
        record = dict(title="Registers, spills and shared memory of the shipped kernel configs on sm_90a (ptxas)",
                      what=" ".join(__doc__.split()),
                      card="none: compiled for sm_90a (H100/H200) with Triton's bundled ptxas",
                      date=time.strftime("%Y-%m-%d"), commit=args.commit, source="this file",
                      triton=triton.__version__, ptxas=version.splitlines()[-1],
                      command=" ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                      columns=["kernel", "variant", "config", "registers", "spill stores (bytes)",
                               "spill loads (bytes)", "shared memory (bytes)"], rows=rows)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
