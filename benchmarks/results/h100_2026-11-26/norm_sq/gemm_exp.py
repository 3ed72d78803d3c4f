"""Experiment: (A) where the QKV/head norm's sum of squares is taken; (B) split-K for P=1 decode GEMMs.

Each case: CUDA graph of CALLS calls over rotated input copies, 40 replays, median us per call.
"""
import json, math, os, sys
import torch, triton
import cqil_kernels.ops.group_gemm as G
from cqil_kernels.ops._common import next_pow2
from cqil_kernels.ops._pdl import pdl_options

CALLS = 24
VARIANTS = os.environ.get("VARIANTS", "nonorm,sq_after,sq_mma,mma_native,native,T_no_nw,T_no_sq,T_mma_no_nw").split(",")
L2 = 50 * 2**20
dev = "cuda"
res = []


def time_graph(make, op, nbytes, rounds=40):
    copies = max(1, min(CALLS, math.ceil(2.5 * L2 / nbytes)))
    sets = [make() for _ in range(copies)]
    op(*sets[0]); torch.cuda.synchronize()
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for a in sets:
            op(*a)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(CALLS):
            op(*sets[i % copies])
    for _ in range(5):
        g.replay()
    ts = []
    for _ in range(rounds):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(); g.replay(); e1.record(); e1.synchronize()
        ts.append(e0.elapsed_time(e1) * 1e3 / CALLS)
    ts.sort()
    return ts[len(ts) // 2]


def rec(**kw):
    res.append(kw)
    print(json.dumps(kw), flush=True)


def bf(*s, scale=1.0):
    return (torch.randn(*s, device=dev) * scale).to(torch.bfloat16)


def norm_case(name, P, M, N, K, shared=True):
    def make():
        x = bf(M, K) if shared else bf(P, M, K)
        return x, bf(P, N, K, scale=K ** -0.5), (1 + 0.1 * torch.randn(P, K, device=dev)).to(torch.bfloat16), \
            torch.empty(P, M, N, device=dev, dtype=torch.bfloat16)
    nbytes = P * N * K * 2
    ref = None
    for variant in VARIANTS:
        G.NORM_SQ, G.NORM_EXP = {"nonorm": (0, 0), "sq_after": (0, 0), "sq_in": (1, 0), "sq_before": (2, 0),
                                 "sq_mma": (3, 0), "mma_native": (3, 3), "native": (0, 3),
                                 "T_no_nw": (0, 1), "T_no_sq": (0, 2), "T_mma_no_nw": (3, 1)}[variant]
        G._group_gemm_kernel.cache.clear()
        if variant == "nonorm":
            op = lambda x, w, nw, o: G.group_linear(x, w, out=o)
        else:
            op = lambda x, w, nw, o: G.group_linear(x, w, norm_weight=nw, eps=1e-5, out=o)
        if variant != "nonorm" and not variant.startswith("T_"):  # all forms agree forms agree
            torch.manual_seed(1); x, w, nw, o = make()
            y = op(x, w, nw, o).float()
            if ref is None:
                ref = y
            err = ((y - ref).norm() / ref.norm()).item()
        else:
            err = None
        t = time_graph(make, op, nbytes)
        best = G._group_gemm_kernel.best_config
        rec(case=name, variant=variant, us=round(t, 2), gbps=round(nbytes / t / 1e3), err_vs_after=err,
            config=str(best))
    G.NORM_SQ = G.NORM_EXP = 0


def split_launch(x, w, out, S, residual=None):
    """x [1, M, F], w [1, D, F] -> out [M, D] = residual + x w^T, K split into S parts + ordered sum."""
    _, M, F = x.shape
    D = w.shape[1]
    if S == 1:
        return G.group_down_sum(x, w, residual, out=out)
    f = F // S
    xv = x.as_strided((S, M, f), (f, F, 1))
    wv = w.as_strided((S, D, f), (f, F, 1))
    part = torch.empty((S, M, D), device=x.device, dtype=torch.float32)
    G._launch(xv, wv, part, sx=(f, F))
    block = min(1024, next_pow2(D))
    G._sum_p_kernel[(M, triton.cdiv(D, block))](
        part, residual if residual is not None else part, out, S, D, part.stride(0), part.stride(1),
        residual.stride(0) if residual is not None else 0, out.stride(0), HAS_RES=residual is not None,
        BLOCK=block, **pdl_options(x))
    return out


def split_case(name, M, D, F, with_res, splits):
    def make():
        return bf(1, M, F), bf(1, D, F, scale=F ** -0.5), bf(M, D), torch.empty(M, D, device=dev, dtype=torch.bfloat16)
    nbytes = D * F * 2
    torch.manual_seed(2)
    x, w, r, o = make()
    ref = (x[0].double() @ w[0].double().T + (r.double() if with_res else 0))
    for S in splits:
        if F % S:
            continue
        op = lambda x, w, r, o: split_launch(x, w, o, S, r if with_res else None)
        y = op(x, w, r, o.clone()).double()
        err = ((y - ref).norm() / ref.norm()).item()
        t = time_graph(make, op, nbytes)
        rec(case=name, variant=f"S={S}", us=round(t, 2), gbps=round(nbytes / t / 1e3), err_f64=err)


def sweep(name, P, M, N, K, variants=("nonorm", "sq_after", "sq_mma", "sq_trans")):
    """Every decode config, timed in the graph, per variant (the autotuner bypassed)."""
    import triton as tr
    cfgs = [c for c in G._configs() if c.kwargs["BLOCK_M"] == 16]
    kern = G._group_gemm_kernel
    def make():
        return bf(M, K), bf(P, N, K, scale=K ** -0.5), (1 + 0.1 * torch.randn(P, K, device=dev)).to(torch.bfloat16), \
            torch.empty(P, M, N, device=dev, dtype=torch.bfloat16)
    nbytes = P * N * K * 2
    for variant in variants:
        G.NORM_SQ = {"nonorm": 0, "sq_after": 0, "sq_mma": 3, "sq_trans": 4}[variant]
        for c in cfgs:
            class Fixed:
                def __getitem__(self, grid):
                    def call(*a, **kw):
                        meta = dict(c.kwargs)
                        g = grid(meta)
                        return kern.fn[g](*a, **kw, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
                    return call
            G._group_gemm_kernel = Fixed()
            try:
                if variant == "nonorm":
                    op = lambda x, w, nw, o: G.group_linear(x, w, out=o)
                else:
                    op = lambda x, w, nw, o: G.group_linear(x, w, norm_weight=nw, eps=1e-5, out=o)
                t = time_graph(make, op, nbytes, rounds=25)
                rec(case=name, variant=variant, us=round(t, 2), gbps=round(nbytes / t / 1e3),
                    config=f"{c.kwargs['BLOCK_N']}x{c.kwargs['BLOCK_K']} w{c.num_warps} s{c.num_stages}")
            except Exception as e:  # out of resources
                print(name, variant, c, type(e).__name__, str(e)[:100], flush=True)
            finally:
                G._group_gemm_kernel = kern
    G.NORM_SQ = 0


def sweep_main():
    sweep("qkv7b_P1", 1, 1, 12288, 4096)
    sweep("head7b", 1, 1, 32000, 4096)
    sweep("qkv7b_P2", 2, 1, 12288, 4096)
    sweep("qkv_smol_P4", 4, 1, 960, 576)
    sweep("head_smol", 1, 1, 49152, 576)
    sweep("qkv_smol_P1", 1, 1, 960, 576)
    best = {}
    for r in res:
        k = (r["case"], r["variant"])
        if k not in best or r["us"] < best[k]["us"]:
            best[k] = r
    json.dump(dict(card=torch.cuda.get_device_name(), commit=os.environ.get("CQIL_COMMIT", "wip"), results=res),
              open(f"{os.environ.get('OUT', '/tmp')}/gemm_sweep.json", "w"), indent=1)
    print("\n| case | variant | best us | config |")
    for (c, v), r in best.items():
        print(f"| {c} | {v} | {r['us']} | {r['config']} |")


if __name__ == "__main__" and sys.argv[1:] == ["sweep"]:
    sweep_main()
elif __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    print(torch.cuda.get_device_name(), flush=True)
    if which in ("all", "norm"):
        norm_case("qkv7b_P1", 1, 1, 12288, 4096)
        norm_case("head7b", 1, 1, 32000, 4096)
        norm_case("qkv7b_P2", 2, 1, 12288, 4096)
        norm_case("qkv_smol_P1", 1, 1, 960, 576)
        norm_case("qkv_smol_P4", 4, 1, 960, 576)
        norm_case("head_smol", 1, 1, 49152, 576)
    if which in ("all", "split"):
        split_case("down7b", 1, 4096, 11008, True, [1, 2, 4, 8])
        split_case("oproj7b", 1, 4096, 4096, True, [1, 2, 4, 8])
        split_case("down_smol", 1, 576, 1536, True, [1, 2, 4, 8])
        split_case("oproj_smol", 1, 576, 576, True, [1, 2, 4])
        split_case("down7b_M4", 4, 4096, 11008, True, [1, 2, 4])
    out = os.environ.get("OUT", "/tmp")
    json.dump(dict(card=torch.cuda.get_device_name(), commit=os.environ.get("CQIL_COMMIT", "wip"), results=res),
              open(f"{out}/gemm_exp_{which}.json", "w"), indent=1)
    print("\n| case | variant | us | GB/s |")
    for r in res:
        print(f"| {r['case']} | {r['variant']} | {r['us']} | {r['gbps']} |")

