"""Same-process A/B of the prefill attention plan: one-GPU LLaMA-7B graph prefill (fused.step), the tile
plan before (BLOCK_M 128 from 1024 rows, BLOCK_N 64) and after (ops/attention.py _plan), alternated."""
import sys, json, functools, statistics
sys.path.insert(0, "benchmarks")
import torch
from cqil_kernels import fused
from cqil_kernels.ops import attention as A
from cqil_kernels.bench import random_model, _warm_up_gpu, _commit
from parallel_e2e import graph_prefill_ms

out = sys.argv[1]
dev = torch.device("cuda", 0)
new_plan = A._plan
def old_plan(P, B, Hkv, T, G, Dh, dtype, num_splits):
    if T * G <= 16:
        return new_plan(P, B, Hkv, T, G, Dh, dtype, num_splits)
    return (128 if T * G >= 1024 else 64), 64, 1, 4 if dtype != torch.float32 else 8
model = random_model("llama-7b", torch.bfloat16, dev)
model.backend = "triton"
_warm_up_gpu(dev)
res = {"commit": _commit(), "card": torch.cuda.get_device_name(0)}
with torch.inference_mode():
    for P in (256, 512, 1024, 2048):
        ids = torch.randint(0, 32000, (1, P), generator=torch.Generator().manual_seed(0)).to(dev)
        t = {"before": [], "after": []}
        for r in range(4):
            for name, plan in (("before", old_plan), ("after", new_plan))[::1 if r % 2 == 0 else -1]:
                A._plan = plan
                t[name].append(graph_prefill_ms(functools.partial(fused.step, model), model.new_cache, ids, together=False))
        A._plan = new_plan
        b, a = statistics.median(t["before"]), statistics.median(t["after"])
        res[P] = dict(times_ms=t, before_median=b, after_median=a)
        print(f"prompt {P}: graph prefill before {b:.3f} ms, after {a:.3f} ms ({100 * (1 - a / b):.1f}% less)", flush=True)
json.dump(res, open(out, "w"), indent=1)
