"""Host microseconds per launcher call in an eager prefill step (current package), and Triton baselines."""
import cProfile, collections, functools, io, json, os, pstats, statistics, sys, time
import torch, triton, triton.language as tl
from cqil_kernels import fused, CQILConfig
from cqil_kernels.bench import random_model
from cqil_kernels.demo import parse_groups

out = os.environ["OUT"]
dev = torch.device("cuda")
res = {}

def per_call_us(fn, n=400):
    fn(); torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return round(t, 2)

a = torch.randn(16, 576, device=dev); b = torch.randn(16, 576, device=dev); c = torch.empty_like(a)
res["torch.add(out=)"] = per_call_us(lambda: torch.add(a, b, out=c))
w = torch.randn(576, 576, device=dev)
res["torch.matmul"] = per_call_us(lambda: torch.matmul(a, w.T))

@triton.jit
def k1(x_ptr, N: tl.constexpr):
    pass

@triton.jit
def k40(p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, i0, i1, i2, i3, i4, i5, i6, i7, i8, i9, i10,
        i11, i12, i13, i14, i15, i16, i17, i18, f0, A: tl.constexpr, B: tl.constexpr, C: tl.constexpr):
    pass

res["triton 1 arg"] = per_call_us(lambda: k1[(1,)](a, N=4))
ints = [3, 576, 1, 7, 4096, 11008, 4, 1, 2, 33, 576, 1, 1152, 0, 576, 5, 9, 64, 128]
res["triton 37 args"] = per_call_us(lambda: k40[(1,)](*([a] * 13), *ints, 1e-6, A=1, B=2, C=3))

@triton.autotune(configs=[triton.Config({"A": 1}), triton.Config({"A": 2})], key=["i0", "i1"])
@triton.jit
def k40a(p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, i0, i1, i2, i3, i4, i5, i6, i7, i8, i9, i10,
        i11, i12, i13, i14, i15, i16, i17, i18, f0, A: tl.constexpr, B: tl.constexpr, C: tl.constexpr):
    pass
res["triton 37 args autotuned"] = per_call_us(lambda: k40a[(1,)](*([a] * 13), *ints, 1e-6, B=2, C=3))
print(res, flush=True)

# per launcher, inside real eager prefill steps
model = random_model(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m", torch.bfloat16, dev)
timings = collections.defaultdict(list)
names = ["linear", "swiglu", "down_sum", "rope_kv_write", "group_attention", "group_residual",
         "group_swiglu", "group_down_sum", "advance", "head", "packed_layers", "stage_forward"]
orig = {n: getattr(fused, n) for n in names}
def wrap(n, f):
    @functools.wraps(f)
    def g(*a, **k):
        t0 = time.perf_counter(); r = f(*a, **k); timings[n].append(time.perf_counter() - t0); return r
    return g
for T in (16, 512):
    for kind, cfg in (("seq", CQILConfig()), ("cqil", parse_groups("2-26:4"))):
        model.cqil = cfg
        ids = torch.randint(0, model.args.vocab_size, (1, T), device=dev)
        with torch.inference_mode():
            for _ in range(3):
                model(ids, cache=model.new_cache(1, T))
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(10):
                model(ids, cache=model.new_cache(1, T))
            torch.cuda.synchronize()
            plain = (time.perf_counter() - t0) / 10 * 1e3
            t0 = time.perf_counter()
            for _ in range(10):
                fused.step(model, ids, None, model.new_cache(1, T))
            step_only = (time.perf_counter() - t0) / 10 * 1e3
            torch.cuda.synchronize()
            timings.clear()
            for n in names:
                setattr(fused, n, wrap(n, orig[n]))
            for _ in range(10):
                model(ids, cache=model.new_cache(1, T))
            torch.cuda.synchronize()
            for n in names:
                setattr(fused, n, orig[n])
            r = {n: (len(v) // 10, round(statistics.median(v) * 1e6, 1)) for n, v in timings.items()}
            res[f"{kind}@{T}"] = dict(forward_ms=round(plain, 3), step_enqueue_ms=round(step_only, 3), per_call_us=r)
            print(kind, T, res[f"{kind}@{T}"], flush=True)
            if T == 16:
                pr = cProfile.Profile(); pr.enable()
                for _ in range(5):
                    model(ids, cache=model.new_cache(1, T))
                pr.disable(); torch.cuda.synchronize()
                buf = io.StringIO()
                st = pstats.Stats(pr, stream=buf); st.sort_stats("tottime").print_stats(45)
                st.sort_stats("cumulative").print_stats(50)
                open(f"{out}/cprofile_{kind}.txt", "w").write(buf.getvalue())
json.dump(res, open(f"{out}/launch_cost.json", "w"), indent=1)
