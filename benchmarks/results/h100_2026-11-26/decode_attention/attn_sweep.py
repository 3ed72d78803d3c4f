"""Decode attention sweep (not committed): current kernel over (splits, BLOCK_N, warps, stages) and a
CUDA-core prototype for one query row per kv head. Graph of 24 calls cycling inputs, event-timed."""
import json, math, sys, statistics
import torch, triton, triton.language as tl
from cqil_kernels.ops import attention as A
from cqil_kernels.ops._common import next_pow2

CALLS = 24
dev = "cuda"


def time_graph(make, op, nbytes):
    copies = max(1, min(CALLS, math.ceil(2.5 * 50 * 2**20 / nbytes)))
    sets = [make() for _ in range(copies)]
    op(*sets[0]); torch.cuda.synchronize()
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for x in sets: op(*x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(CALLS): op(*sets[i % copies])
    for _ in range(5): g.replay()
    ts = []
    for _ in range(40):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record(); g.replay(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b) * 1e3 / CALLS)
    return statistics.median(ts)


@triton.jit
def _proto(q_ptr, k_ptr, v_ptr, start_ptr, part_ptr, stat_ptr, split_len, S, scale,
           HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_h, pid_s = tl.program_id(0), tl.program_id(1)
    start = tl.load(start_ptr)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + pid_h * HEAD_DIM + d).to(tl.float32) * scale
    lo = pid_s * split_len
    hi = tl.minimum(lo + split_len, start + 1)
    base = pid_h.to(tl.int64) * S * HEAD_DIM
    m = tl.max(tl.full((BLOCK_N,), float("-inf"), tl.float32), 0)
    l = tl.sum(tl.zeros((BLOCK_N,), tl.float32), 0)
    acc = tl.zeros((HEAD_DIM,), tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        kp = n0 + tl.arange(0, BLOCK_N)
        ok = kp < hi
        k = tl.load(k_ptr + base + kp[:, None] * HEAD_DIM + d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(v_ptr + base + kp[:, None] * HEAD_DIM + d[None, :], mask=ok[:, None], other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], 1)
        s = tl.where(ok, s, float("-inf"))
        mn = tl.maximum(m, tl.max(s, 0))
        mu = tl.where(mn == float("-inf"), 0.0, mn)
        al = tl.exp2(m - mu)
        p = tl.exp2(s - mu)
        l = l * al + tl.sum(p, 0)
        acc = acc * al + tl.sum(p[:, None] * v.to(tl.float32), 0)
        m = mn
    row = (pid_h * tl.num_programs(1) + pid_s) * BLOCK_M
    tl.store(part_ptr + row * HEAD_DIM + d, acc)
    tl.store(stat_ptr + row * 2, m)
    tl.store(stat_ptr + row * 2 + 1, l)


def main(out_path):
    res = []
    cases = [("7b", 1, 32, 32, 128), ("7b", 4, 32, 32, 128), ("smol", 1, 9, 3, 64), ("smol", 4, 9, 3, 64)]
    S, start = 578, 540
    for name, P, H, Hkv, Dh in cases:
        valid = torch.ones(1, S, dtype=torch.bool, device=dev)
        st = torch.tensor([start], dtype=torch.int32, device=dev)
        make = lambda: (torch.randn(P, 1, 1, H, Dh, device=dev, dtype=torch.bfloat16),
                        torch.randn(P, 1, Hkv, S, Dh, device=dev, dtype=torch.bfloat16),
                        torch.randn(P, 1, Hkv, S, Dh, device=dev, dtype=torch.bfloat16))
        nbytes = 2 * P * 2 * Hkv * (start + 1) * Dh
        ref_plan = A._plan
        us = time_graph(make, lambda q, k, v: A.group_attention(q, k, v, valid, st), nbytes)
        res.append(dict(case=name, P=P, cfg="default", us=us)); print(name, P, "default", round(us, 2), flush=True)
        for splits in (3, 5, 8, 10, 16):
            for bn in (32, 64):
                for w in (2, 4):
                    if bn * splits > 2 * S:
                        continue
                    A._plan = lambda *a, bn=bn, w=w, sp=splits: (16, bn, sp, w)
                    try:
                        us = time_graph(make, lambda q, k, v: A.group_attention(q, k, v, valid, st), nbytes)
                    except Exception as e:  # noqa
                        print("fail", splits, bn, w, e); continue
                    finally:
                        A._plan = ref_plan
                    res.append(dict(case=name, P=P, cfg=f"s{splits}_n{bn}_w{w}", us=us))
                    print(name, P, f"s{splits} n{bn} w{w}", round(us, 2), flush=True)
        if Hkv == H:  # prototype, separate merge kernel
            for splits in (8, 16, 32):
                for bn in (16, 32, 64):
                    for w in (2, 4):
                        split_len = triton.cdiv(triton.cdiv(S, splits), bn) * bn
                        sp = triton.cdiv(S, split_len)
                        heads = P * Hkv
                        part = torch.empty(heads * sp * 16, Dh, device=dev)
                        stat = torch.empty(heads * sp * 16, 2, device=dev)

                        def run(q, k, v):
                            out = torch.empty_like(q)
                            _proto[(heads, sp)](q, k, v, st, part, stat, split_len, S,
                                                math.log2(math.e) / math.sqrt(Dh), HEAD_DIM=Dh, BLOCK_N=bn,
                                                BLOCK_M=16, num_warps=w)
                            A._merge_kernel[(heads,)](part, stat, out, 1, 1, Hkv, 1, sp, *out.stride()[:4],
                                                      HEAD_DIM=Dh, BLOCK_D=Dh, BLOCK_M=16, USE_GDC=False)
                            return out
                        q, k, v = make()
                        ref = A.group_attention(q, k, v, valid, st).float()
                        err = (run(q, k, v).float() - ref).abs().max().item()
                        us = time_graph(make, run, nbytes)
                        res.append(dict(case=name, P=P, cfg=f"proto_s{sp}_n{bn}_w{w}", us=us, err=err))
                        print(name, P, f"proto s{sp} n{bn} w{w}", round(us, 2), "err", err, flush=True)
        # separate-merge baseline of the current kernel
        us = time_graph(make, lambda q, k, v: A.group_attention(q, k, v, valid, st, merge="separate"), nbytes)
        res.append(dict(case=name, P=P, cfg="default_separate", us=us)); print(name, P, "default separate", round(us, 2))
        best = sorted([r for r in res if r["case"] == name and r["P"] == P], key=lambda r: r["us"])[:5]
        print("BEST", name, P, [(r["cfg"], round(r["us"], 2)) for r in best], "ideal_us",
              round(nbytes / 3.0e6, 2), flush=True)
    json.dump(dict(card=torch.cuda.get_device_name(), results=res), open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
