"""Register use of the group GEMM kernel in decode configs, compiled offline for sm_90 (no GPU needed):
triton.compile of an ASTSource with divisibility-16 hints on pointers, strides, N and K (as real launches
get), then cuobjdump -res-usage / -sass. Printed: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), mode, counts."""
import os, subprocess, glob, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from cqil_kernels.ops import group_gemm as G
k = G._group_gemm_kernel.fn
names = k.arg_names
ptrs = [n for n in names if n.endswith("_ptr")]
cons = {"NORM", "SWIGLU", "ROPE", "HALF", "SUM_P", "HAS_BIAS", "HAS_RES", "UPCAST", "DOT_PRECISION", "USE_GDC", "BLOCK_M", "BLOCK_N", "BLOCK_K"}
cuobj = glob.glob(os.path.dirname(triton.__file__) + "/backends/nvidia/bin/cuobjdump")[0]
def build(norm, swiglu, bm=16, bn=32, bk=256, w=4, s=4):
    sig = {}
    for n in names:
        if n in cons: sig[n] = "constexpr"
        elif n.endswith("_ptr"): sig[n] = "*bf16" if n not in ("pos_ptr", "start_ptr") else ("*i64" if n == "pos_ptr" else "*i32")
        elif n == "eps": sig[n] = "fp32"
        else: sig[n] = "i32"
    sig["inv_freq_ptr"] = "*fp32"
    c = dict(NORM=norm, SWIGLU=swiglu, ROPE=False, HALF=1, SUM_P=False, HAS_BIAS=False, HAS_RES=False, UPCAST=False,
             DOT_PRECISION="tf32", USE_GDC=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    div = [n for n in names if n not in cons and (n.endswith("_ptr") or n.startswith("stride_") or n in ("N", "K"))
           and n not in ("stride_pb",)]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div}
    src = ASTSource(fn=k, signature=sig, constexprs={(names.index(n),): v for n, v in c.items()}, attrs=attrs)
    comp = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=w, num_stages=s))
    open("/tmp/g.cubin", "wb").write(comp.asm["cubin"])
    sass = subprocess.run([cuobj, "-sass", "/tmp/g.cubin"], capture_output=True, text=True).stdout
    lines = [l for l in sass.splitlines() if l.strip().startswith("/*") and ";" in l]
    res = subprocess.run([cuobj, "-res-usage", "/tmp/g.cubin"], capture_output=True, text=True).stdout
    import re
    reg = re.search(r"REG:(\d+)", res).group(1); stack = re.search(r"STACK:(\d+)", res).group(1)
    return dict(regs=reg, stack=stack, instr=len(lines), ldg=sass.count("LDG"), mma=sass.count("HMMA") + sass.count("HGMMA"), bra=sass.count("BRA"))
for cfg in [(16, 16, 512, 4, 3), (16, 32, 256, 4, 4), (16, 64, 256, 4, 4), (16, 128, 128, 8, 4)]:
    for norm, sw in [(False, True), (True, True), (True, False), (False, False)]:
        print(cfg, "norm" if norm else "    ", "swiglu" if sw else "linear", build(norm, sw, *cfg))
