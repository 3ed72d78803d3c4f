"""Kernel-time breakdown of rank 0's graph prefill, unsplit vs micro-batched (one GPU, reductions skipped)."""
import sys, tempfile, json, os
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import torch, torch.distributed as dist
from torch.profiler import profile, ProfilerActivity
from cqil_kernels import fused
from cqil_kernels.bench import SHAPES, random_model, shape_args, _warm_up_gpu
from cqil_kernels.demo import parse_groups
from cqil_kernels.parallel import Placement, RankModel

P = int(sys.argv[1]) if len(sys.argv) > 1 else 512
out = sys.argv[2]
torch.cuda.set_device(0)
device = torch.device("cuda", 0)
tmp = tempfile.mkdtemp()
dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
cqil = parse_groups("12-30:2")
placement = Placement.build(0, 2, shape_args("llama-7b"), cqil)
part = random_model("llama-7b", torch.bfloat16, device, held_layers=placement.held_layers)
part.cqil, part.backend = cqil, "triton"
ranked = RankModel(part, placement, one_shot=False, copy_engine=False)
ranked.reducer.skip_for_benchmark = True
ids = torch.randint(0, 32000, (1, P), generator=torch.Generator().manual_seed(0)).to(device)
_warm_up_gpu(device)
res = {}
with torch.inference_mode():
    for rows in (0, 256):
        ranked.microbatch_rows = rows
        cache = ranked.new_cache(1, P + 2)
        def run():
            cache.position.zero_(); cache.n_tokens.zero_()
            ranked._triton_step(ids, None, cache)
        run(); torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run()
        for _ in range(3):
            g.replay()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                g.replay()
            torch.cuda.synchronize()
        rows_out = []
        for e in prof.key_averages():
            t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            if t > 0:
                rows_out.append((e.key[:110], e.count // 5, t / 5))
        rows_out.sort(key=lambda r: -r[2])
        total = sum(r[2] for r in rows_out)
        res[rows] = dict(total_us=total, kernels=rows_out)
        print(f"== microbatch_rows {rows}: kernel time {total/1000:.3f} ms per prefill")
        for k, c, t in rows_out[:30]:
            print(f"{t:9.1f} us  x{c:4d}  {k}")
json.dump(res, open(out, "w"), indent=1)
dist.destroy_process_group()
