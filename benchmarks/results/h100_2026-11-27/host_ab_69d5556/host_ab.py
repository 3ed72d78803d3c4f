"""Host time of an eager prefill, b0f148b's package (cqil_old) vs the working tree, same process, alternated."""
import json, os, statistics, sys, time
sys.path.insert(0, os.path.join(os.getcwd(), ".base/abpkg"))
import torch
import cqil_old, cqil_kernels
from cqil_kernels.bench import random_model as new_random, _warm_up_gpu
from cqil_old.bench import random_model as old_random
os.environ.update(CQIL_FOLD_RESIDUAL="0", CQIL_PREFILL_BLAS_ROWS="0")  # the same launches in both
dev = torch.device("cuda")
shape = sys.argv[1]
models = {"old": old_random(shape, torch.bfloat16, dev), "new": new_random(shape, torch.bfloat16, dev)}
_warm_up_gpu(dev, 1.0)
res = {}
for T in (16, 512):
    ids = torch.randint(0, 1000, (1, T), device=dev)
    with torch.inference_mode():
        for m in models.values():
            for _ in range(3):
                m(ids, cache=m.new_cache(1, T))
        torch.cuda.synchronize()
        times = {k: [] for k in models}
        for r in range(20):
            for k in (("old", "new") if r % 2 == 0 else ("new", "old")):
                m = models[k]
                t0 = time.perf_counter()
                m(ids, cache=m.new_cache(1, T))
                times[k].append((time.perf_counter() - t0) * 1e3)
                torch.cuda.synchronize()
    res[T] = {k: dict(median_ms=statistics.median(v), all=[round(x, 2) for x in v]) for k, v in times.items()}
    print(shape, T, {k: round(v["median_ms"], 3) for k, v in res[T].items()}, flush=True)
json.dump(res, open(f"{os.environ['OUT']}/host_ab_{shape}.json", "w"), indent=1)
