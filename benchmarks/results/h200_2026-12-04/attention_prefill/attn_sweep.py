"""Prefill attention: BLOCK_M x BLOCK_N x warps sweep for LLaMA-7B heads (P=1, B=1), T rows at cache offset start."""
import sys, json, itertools
import torch
from cqil_kernels.ops import attention as A
from cqil_kernels.bench import _events_ms

out = sys.argv[1]
dev = torch.device("cuda", 0)
H, Dh = 32, 128
res = []
real_plan = A._plan
for T, start in [(256, 0), (256, 256), (512, 0), (1024, 0), (1024, 1024), (2048, 0), (128, 0)]:
    S = start + T + 2
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, 1, T, H, Dh, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, 1, H, S, Dh, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, 1, H, S, Dh, device=dev, dtype=torch.bfloat16, generator=g)
    valid = torch.ones(1, S, dtype=torch.bool, device=dev)
    st = torch.tensor([start], dtype=torch.int32, device=dev)
    ref = A.group_attention(q, k, v, valid, st)
    default = real_plan(1, 1, H, T, 1, Dh, torch.bfloat16, None)
    for bm, bn, w in itertools.product((16, 32, 64, 128), (32, 64, 128), (4, 8)):
        A._plan = lambda *a, bm=bm, bn=bn, w=w: (bm, bn, 1, w)
        try:
            o = A.group_attention(q, k, v, valid, st)
            err = (o.float() - ref.float()).abs().max().item()
            g_ = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g_):
                for _ in range(20):
                    A.group_attention(q, k, v, valid, st, out=o)
            us = 1000 * _events_ms(g_.replay, 20) / 20
        except Exception as e:  # noqa: BLE001
            us, err = None, repr(e)[:100]
        A._plan = real_plan
        res.append(dict(T=T, start=start, block_m=bm, block_n=bn, warps=w, us=us, err=err,
                        default=(bm, bn, w) == (default[0], default[1], default[3])))
    rows = [r for r in res if r["T"] == T and r["start"] == start and r["us"]]
    best = min(rows, key=lambda r: r["us"])
    d = [r for r in rows if r["default"]]
    print(f"T {T} start {start}: default {default[:2]},{default[3]} {d[0]['us'] if d else None:.1f} us; best "
          f"{best['block_m']}x{best['block_n']} w{best['warps']} {best['us']:.1f} us; top5 " +
          ", ".join(f"{r['block_m']}x{r['block_n']}w{r['warps']}:{r['us']:.1f}" for r in sorted(rows, key=lambda r: r['us'])[:5]),
          flush=True)
json.dump(res, open(out, "w"), indent=1)
