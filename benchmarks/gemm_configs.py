"""Every candidate config of the group GEMM timed alone, in each launch form a decode step makes, beside the
compiler's register and spill facts of that config (benchmarks/kernel_registers.py) and the launcher's own
choice (group_gemm._tune_decode). The launcher keeps the fastest of its candidates; this says how far apart they
are and whether a config outside the list (--extra) would beat them, e.g. one that does not spill.

    python benchmarks/gemm_configs.py --shape llama-7b --shape smollm2-135m --extra 16,32,128,8,4 \\
        --out gemm_configs.json

Forms (P layers of a group, M rows): qkv (group_linear with the input norm), o_proj (with the residual),
gate/up (group_swiglu with the post-attention norm), down (group_down_sum with the fp32 residual: decode
runs it as partial products and their sum), lm_head (the final norm and LM head, one group_linear of one layer
whatever P is). Each config runs as the only candidate (the candidate list
replaced for the run); each timing is a CUDA graph of CALLS launches over enough input copies to stay out of
L2, timed with CUDA events, the median of --rounds replays. Beside the launcher's choice, triton.autotune's
for the same launch (what decode keys took before the launcher timed them itself), and how long the
launcher's choosing took (wall clock, once with Triton compiling what its cache lacks, once more with the
kernels compiled: what the first decode step of a process pays per key where no choice is kept on disk).
Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import kernel_registers  # benchmarks/ (the script's folder)
import replay

DEVICE = "cuda"  # (tests run the loop on the CPU, with the timing replaced)
FORMS = ("qkv", "o_proj", "gate/up", "down", "lm_head")


@contextlib.contextmanager
def forced_config(config):
    """The group GEMM launched with `config` (a triton.Config) alone: the autotuner's candidates replaced by it
    and the launcher's remembered choices (_CHOSEN) set aside, both restored after."""
    from cqil_kernels.ops import group_gemm

    kernel, chosen = group_gemm._group_gemm_kernel, dict(group_gemm._CHOSEN)
    configs = kernel.configs
    kernel.configs = [config]
    group_gemm._CHOSEN.clear()
    try:
        yield
    finally:
        kernel.configs = configs
        group_gemm._CHOSEN.clear()
        group_gemm._CHOSEN.update(chosen)


def form_inputs(form: str, shape: dict, P: int, M: int, device, dtype, scale: float = 0.02):
    """(op, make_inputs, bytes moved) of a launch form for a shape (D, H, Hkv, Dh, F, V)."""
    import torch

    from cqil_kernels.ops.group_gemm import group_down_sum, group_linear, group_swiglu

    D, F, K_o = shape["D"], shape["F"], shape["H"] * shape["Dh"]
    N_qkv = (shape["H"] + 2 * shape["Hkv"]) * shape["Dh"]

    def randn(*size, dt=dtype, s=1.0):
        return s * torch.randn(*size, device=device, dtype=dt)

    if form == "qkv":
        return ((lambda h, w, nw: group_linear(h, w, norm_weight=nw)),
                lambda: (randn(M, D), randn(P, N_qkv, D, s=scale), 1 + randn(P, D, s=0.1)),
                2 * (P * N_qkv * D + M * D + P * M * N_qkv))
    if form == "o_proj":
        return ((lambda x, w, h: group_linear(x, w, residual=h)),
                lambda: (randn(P, M, K_o), randn(P, D, K_o, s=scale), randn(M, D)),
                2 * (P * D * K_o + P * M * K_o + M * D + P * M * D))
    if form == "gate/up":
        return ((lambda x, wg, wu, nw: group_swiglu(x, wg, wu, norm_weight=nw)),
                lambda: (randn(P, M, D), randn(P, F, D, s=scale), randn(P, F, D, s=scale), 1 + randn(P, D, s=0.1)),
                2 * (2 * P * F * D + P * M * D + P * M * F))
    if form == "down":
        return ((lambda x, w, res: group_down_sum(x, w, res)),
                lambda: (randn(P, M, F), randn(P, D, F, s=scale), randn(M, D, dt=torch.float32)),
                2 * (P * D * F + P * M * F) + 4 * M * D + 2 * M * D)
    if form == "lm_head":  # the final norm + LM head, one GEMM in decode (fused.head): one layer whatever P is
        V = shape["V"]
        return ((lambda h, w, nw: group_linear(h, w, norm_weight=nw)),
                lambda: (randn(M, D), randn(1, V, D, s=scale), 1 + randn(1, D, s=0.1)),
                2 * (V * D + M * D + M * V))
    raise ValueError(f"unknown form {form!r} (one of {FORMS})")


def launcher_choice(op, inputs, autotuner: bool = False) -> tuple[int, int, int, int, int]:
    """The config the group GEMM's launcher picks for the form's launch (one key per form), with its memory
    (_CHOSEN) emptied first and put back after; autotuner: the pick of triton.autotune's path, which the launcher
    takes where it does not time a key itself (its in-process memory of earlier picks set aside too)."""
    from cqil_kernels.ops import group_gemm

    kernel = group_gemm._group_gemm_kernel
    kept, tunes_here, autotuned = dict(group_gemm._CHOSEN), group_gemm._tunes_here, kernel.cache
    group_gemm._CHOSEN.clear()
    if autotuner:
        group_gemm._tunes_here = lambda x: False
        kernel.cache = {}
    try:
        op(*inputs)
        (c,) = group_gemm._CHOSEN.values()
    finally:
        group_gemm._tunes_here, kernel.cache = tunes_here, autotuned
        group_gemm._CHOSEN.clear()
        group_gemm._CHOSEN.update(kept)
    return c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["num_warps"], c["num_stages"]


def timed_choice(op, inputs) -> tuple[tuple[int, int, int, int, int], float, float]:
    """(the launcher's choice, the ms its first choosing took, the ms a second one took): a decode key's tuning
    cost, with no choice kept on disk (a temporary cache dir, emptied between the two). The first includes
    Triton compiling the candidates where its own cache lacks them; the second is the timing alone."""
    import tempfile
    import time

    import torch

    from cqil_kernels import envs
    from cqil_kernels.ops import group_gemm

    took, on_gpu = [], inputs[0].is_cuda
    with tempfile.TemporaryDirectory() as tmp, envs.overridden(CQIL_CACHE_DIR=tmp):
        for _ in range(2):
            (Path(tmp) / group_gemm.TUNED_FILE).unlink(missing_ok=True)
            if on_gpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
            best = launcher_choice(op, inputs)
            if on_gpu:
                torch.cuda.synchronize()
            took.append((time.perf_counter() - start) * 1e3)
    return best, took[0], took[1]


def parse_config(text: str) -> tuple[int, int, int, int, int]:
    parts = tuple(int(v) for v in text.split(","))
    if len(parts) != 5:
        raise argparse.ArgumentTypeError(f"a config is BLOCK_M,BLOCK_N,BLOCK_K,warps,stages, got {text!r}")
    return parts


# each form's launch in kernel_registers.GEMM_FORMS (its constexprs, for the compiler's facts); down: decode's partial
# products, or where group_down_sum runs as one GEMM (P = 1 below SPLIT_K_MIN, more than 16 rows) the sum over P
REGISTER_FORM = {"qkv": "qkv (norm)", "o_proj": "o_proj (+residual)", "gate/up": "gate/up (norm, swiglu)",
                 "down": "down partials (fp32 out)", "lm_head": "qkv (norm)"}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", help="llama-7b, smollm2-135m, ... (cqil bench's shapes; "
                        "default both of these)")
    parser.add_argument("--form", action="append", choices=FORMS, help="default all")
    parser.add_argument("--P", type=int, default=1, help="layers of a group")
    parser.add_argument("--rows", type=int, default=1, help="M: batch rows of a decode step (<= 16: decode tiles)")
    parser.add_argument("--extra", action="append", type=parse_config, default=[],
                        help="another config BLOCK_M,BLOCK_N,BLOCK_K,warps,stages to time (repeatable)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import torch
    import triton

    from cqil_kernels.bench import shape_args
    from cqil_kernels.ops import group_gemm

    if not torch.cuda.is_available():
        raise SystemExit("gemm_configs.py times kernels: it needs a CUDA GPU")
    # each row class's candidates (group_gemm._prune: 17-64 rows may take a prompt's tile too)
    tables = {0: group_gemm.TUNED_DECODE, 1: group_gemm.TUNED_BATCH + group_gemm.TUNED_PREFILL}
    row_class = group_gemm.row_class(args.rows)
    if row_class not in tables:
        raise SystemExit(f"--rows {args.rows} is a prompt's row class; this sweeps decode and batch configs")
    candidates = list(dict.fromkeys([*tables[row_class], *args.extra]))
    rows, facts_of = [], {}
    for name in args.shape or ["llama-7b", "smollm2-135m"]:
        a = shape_args(name)
        shape = dict(D=a.hidden_size, H=a.num_attention_heads, Hkv=a.num_key_value_heads, Dh=a.head_dim,
                     F=a.intermediate_size, V=a.vocab_size)
        for form in args.form or FORMS:
            op, make, nbytes = form_inputs(form, shape, args.P, args.rows, DEVICE,
                                           torch.bfloat16 if DEVICE == "cuda" else torch.float32)
            inputs = make()
            (best, first_ms, again_ms), autotuned = timed_choice(op, inputs), launcher_choice(op, inputs, True)
            del inputs
            for config in candidates:
                bm, bn, bk, warps, stages = config
                with forced_config(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps,
                                                 num_stages=stages)):
                    us = replay.median_us(op, make, nbytes, args.rounds)
                launch = REGISTER_FORM[form]
                if form == "down" and group_gemm.group_down_partials(*make()[:2]) is None:  # one GEMM, sum over P
                    launch = "down sum over P (+residual)"
                flags, pointers = kernel_registers.GEMM_FORMS[launch]
                key = (tuple(sorted(flags.items())), tuple(sorted(pointers.items())), config)
                if key not in facts_of:  # the same for every shape: compiled once
                    facts_of[key] = kernel_registers.compile_facts("group_gemm", "_group_gemm_kernel", dict(
                        flags, UPCAST=False, DOT_PRECISION="tf32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), pointers,
                        warps, stages)
                facts = facts_of[key]
                row = [name, form, f"{bm}x{bn}x{bk} w{warps} s{stages}", round(us, 2), round(nbytes / us / 1e3, 1),
                       facts["registers"], facts["spill_stores"], config == best, config == autotuned,
                       config in args.extra, round(first_ms, 1), round(again_ms, 1)]
                print(" | ".join(str(v) for v in row), flush=True)
                rows.append(row)
    if args.out:
        replay.write_record(
            args.out, title=f"The group GEMM's decode configs one by one, P {args.P}, {args.rows} rows", doc=__doc__,
            script="gemm_configs.py", argv=argv if argv is not None else sys.argv[1:], rows=rows,
            columns=["shape", "form", "config", "us per call", "GB/s", "registers", "spill stores (bytes)",
                     "the launcher's choice", "triton.autotune's choice", "outside the candidates",
                     "the launcher's choosing ms, first (compiles included)", "its choosing ms, again"])


if __name__ == "__main__":
    main()
