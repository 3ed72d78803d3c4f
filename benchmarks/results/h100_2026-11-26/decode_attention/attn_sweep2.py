"""Decode attention sweep of the working tree's kernel (programs per SM, BLOCK_N, merge tile) against the
8a9124b kernel (attn_old.py), same process, interleaved."""
import json, sys, statistics, itertools
import torch
sys.path.insert(0, "/tmp")
from attn_sweep import time_graph
import attn_old
from cqil_kernels.ops import attention as new
dev = "cuda"
res = []
cases = [("7b", 1, 32, 32, 128, 578, 540), ("7b", 4, 32, 32, 128, 578, 540), ("smol", 1, 9, 3, 64, 578, 540),
         ("smol", 4, 9, 3, 64, 578, 540), ("7b-gqa8", 1, 32, 4, 128, 578, 540), ("7b-longcache", 1, 32, 32, 128, 2048, 540)]
for name, P, H, Hkv, Dh, S, start in cases:
    valid = torch.ones(1, S, dtype=torch.bool, device=dev)
    st = torch.tensor([start], dtype=torch.int32, device=dev)
    make = lambda: (torch.randn(P, 1, 1, H, Dh, device=dev, dtype=torch.bfloat16),
                    torch.randn(P, 1, Hkv, S, Dh, device=dev, dtype=torch.bfloat16),
                    torch.randn(P, 1, Hkv, S, Dh, device=dev, dtype=torch.bfloat16))
    nbytes = 2 * P * 2 * Hkv * (start + 1) * Dh
    q, k, v = make()
    ref = attn_old.group_attention(q, k, v, valid, st).float()
    out = {}
    old = [time_graph(make, lambda q, k, v: attn_old.group_attention(q, k, v, valid, st), nbytes)]
    for per_sm, bn, tile in itertools.product((1, 2, 3, 4, 6), (32, 64, 128), (4096, 16384)):
        if tile == 4096 and H == Hkv:
            continue
        new.DECODE_PROGRAMS_PER_SM, new.DECODE_BLOCK_N, new.MERGE_TILE = per_sm, bn, tile
        try:
            diff = (new.group_attention(q, k, v, valid, st).float() - ref).abs().max().item()
            us = time_graph(make, lambda q, k, v: new.group_attention(q, k, v, valid, st), nbytes)
        except Exception as e:
            print(name, P, per_sm, bn, tile, "FAIL", str(e)[:200], flush=True); continue
        out[(per_sm, bn, tile)] = us
        res.append(dict(case=name, P=P, S=S, start=start, per_sm=per_sm, block_n=bn, merge_tile=tile, us=us, diff=diff))
    old.append(time_graph(make, lambda q, k, v: attn_old.group_attention(q, k, v, valid, st), nbytes))
    new.DECODE_PROGRAMS_PER_SM, new.DECODE_BLOCK_N, new.MERGE_TILE = 2, 64, 16384
    cur = time_graph(make, lambda q, k, v: new.group_attention(q, k, v, valid, st), nbytes)
    res.append(dict(case=name, P=P, S=S, start=start, old_us=old, default_us=cur))
    best = sorted(out.items(), key=lambda kv: kv[1])[:4]
    print(f"{name} P={P} S={S}: old {statistics.mean(old):.2f}  default(2,64,16K) {cur:.2f}  best {[(k, round(v, 2)) for k, v in best]}  ideal {nbytes/3e6:.2f}", flush=True)
json.dump(dict(card=torch.cuda.get_device_name(), results=res), open(sys.argv[1], "w"), indent=1)
