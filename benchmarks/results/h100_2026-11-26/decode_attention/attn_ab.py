"""Same-process A/B of decode attention: the kernel at 8a9124b (attn_old.py) vs the working tree's."""
import json, sys, statistics, importlib.util
import torch
sys.path.insert(0, "/tmp")
from attn_sweep import time_graph
import attn_old
from cqil_kernels.ops import attention as new
dev = "cuda"
res = []
S = 578
for name, P, H, Hkv, Dh, start in [("7b", 1, 32, 32, 128, 540), ("7b", 4, 32, 32, 128, 540), ("smol", 1, 9, 3, 64, 540),
                                   ("smol", 4, 9, 3, 64, 540), ("7b", 1, 32, 32, 128, 60), ("7b-gqa8", 1, 32, 4, 128, 540)]:
    valid = torch.ones(1, S, dtype=torch.bool, device=dev)
    st = torch.tensor([start], dtype=torch.int32, device=dev)
    make = lambda: (torch.randn(P, 1, 1, H, Dh, device=dev, dtype=torch.bfloat16),
                    torch.randn(P, 1, Hkv, S, Dh, device=dev, dtype=torch.bfloat16),
                    torch.randn(P, 1, Hkv, S, Dh, device=dev, dtype=torch.bfloat16))
    q, k, v = make()
    a = attn_old.group_attention(q, k, v, valid, st); b = new.group_attention(q, k, v, valid, st)
    diff = (a.float() - b.float()).abs().max().item()
    nbytes = 2 * P * 2 * Hkv * (start + 1) * Dh
    t = {"old": [], "new": []}
    for r in range(5):
        for impl in (("old", "new") if r % 2 == 0 else ("new", "old")):
            mod = attn_old if impl == "old" else new
            t[impl].append(time_graph(make, lambda q, k, v, mod=mod: mod.group_attention(q, k, v, valid, st), nbytes))
    row = dict(case=name, P=P, start=start, old_us=statistics.median(t["old"]), new_us=statistics.median(t["new"]),
               old_runs=t["old"], new_runs=t["new"], max_abs_diff=diff, ideal_us_at_3TBps=nbytes / 3.0e6)
    res.append(row)
    print(f"{name} P={P} start={start}: old {row['old_us']:.2f} us  new {row['new_us']:.2f} us  (|diff| {diff:.2e})", flush=True)
json.dump(dict(card=torch.cuda.get_device_name(), results=res), open(sys.argv[1], "w"), indent=1)
