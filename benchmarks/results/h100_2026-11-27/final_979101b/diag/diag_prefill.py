"""Reproduce cqil bench's order for one shape and look at the sequential Triton prefill from every side:
events as the bench times it, the device/host split, a cProfile of the host and a torch.profiler kernel
table; then the same after gc + empty_cache, and on a second model built without transformers."""
import cProfile, gc, io, json, pstats, sys, time
import torch
from cqil_kernels import CQILConfig, bench
from cqil_kernels.model import CQILLlama

shape, out = sys.argv[1], sys.argv[2]
dev = torch.device("cuda")
rec = {}
with torch.inference_mode():
    hf = bench.random_hf_model(shape, torch.bfloat16, dev)
    model = CQILLlama.from_pretrained(hf)
    ids = torch.randint(0, model.args.vocab_size, (1, 512), device=dev)
    bench._warm_up_gpu(dev)

    def pre(m=model):
        m(ids, cache=m.new_cache(1, 578))

    rec["hf"] = bench._time_hf(hf, ids, 64, 5)
    model.backend = "torch"
    rec["torch"] = bench._time_ours(model, ids, 64, 5)
    model.backend = "triton"; model.cqil = CQILConfig()
    rec["seq_bench_order"] = bench._time_ours(model, ids, 64, 5)
    print("bench order", rec, flush=True)
    rec["seq_prefill_again"] = bench._events_ms(pre, 10)
    rec["split"] = bench.prefill_split_ms(model, ids, 5, 578)
    walls = []
    for _ in range(10):
        torch.cuda.synchronize(); t0 = time.perf_counter(); pre(); torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) * 1e3)
    rec["wall_ms"] = sorted(walls)
    print("again", rec["seq_prefill_again"], rec["split"], rec["wall_ms"], flush=True)
    pr = cProfile.Profile(); pr.enable()
    for _ in range(5):
        pre()
    torch.cuda.synchronize(); pr.disable()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
    open(f"{out}_cprofile.txt", "w").write(s.getvalue())
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            pre()
        torch.cuda.synchronize()
    open(f"{out}_kernels.txt", "w").write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))
    open(f"{out}_cpu.txt", "w").write(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))
    gc.collect(); torch.cuda.empty_cache()
    rec["after_gc"] = bench._events_ms(pre, 10)
    del hf; gc.collect(); torch.cuda.empty_cache()
    rec["after_del_hf"] = bench._events_ms(pre, 10)
    m2 = bench.random_model(shape, torch.bfloat16, dev)
    m2.backend = "triton"
    pre2 = lambda: pre(m2)
    rec["fresh_model_first"] = bench._events_ms(pre2, 10)
    rec["fresh_split"] = bench.prefill_split_ms(m2, ids, 5, 578)
    rec["model_again"] = bench._events_ms(pre, 10)
    print(json.dumps(rec, indent=1), flush=True)
    json.dump(rec, open(f"{out}.json", "w"), indent=1)
