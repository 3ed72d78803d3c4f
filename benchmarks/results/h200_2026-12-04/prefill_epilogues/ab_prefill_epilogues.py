"""Same-process A/B: the cuBLAS prefill form's epilogues before (torch's elementwise launches) and after
(ops.rms_norm, silu_mul, sum_parts): one-GPU LLaMA-7B graph prefill, sequential and grouped, alternated."""
import sys, json, functools, statistics
sys.path.insert(0, "benchmarks")
import torch
from cqil_kernels import CQILConfig, fused
from cqil_kernels.model import rms_norm
from cqil_kernels.bench import random_model, _warm_up_gpu, _commit
from cqil_kernels.demo import parse_groups
from parallel_e2e import graph_prefill_ms

new = dict(linear=fused.linear, swiglu=fused.swiglu, down_sum=fused.down_sum, head=fused.head)

def old_linear(x, w, *, norm_weight=None, eps=1e-6, bias=None, residual=None):
    if not fused.use_blas(x.shape[-2], w):
        return new["linear"](x, w, norm_weight=norm_weight, eps=eps, bias=bias, residual=residual)
    if norm_weight is not None:
        x = rms_norm(x, norm_weight[:, None, :], eps)
    out = torch.matmul(x, w.transpose(1, 2))
    if bias is not None:
        out += bias[:, None]
    if residual is not None:
        out += residual
    return out

def old_swiglu(x, gate, up, *, bias_gate=None, bias_up=None):
    if not fused.use_blas(x.shape[-2], gate):
        return new["swiglu"](x, gate, up, bias_gate=bias_gate, bias_up=bias_up)
    g, u = torch.matmul(x, gate.transpose(1, 2)), torch.matmul(x, up.transpose(1, 2))
    return torch.nn.functional.silu(g) * u

def old_down_sum(x, w, residual, *, bias=None, out=None):
    if not fused.use_blas(x.shape[-2], w):
        return new["down_sum"](x, w, residual, bias=bias, out=out)
    total = residual.float() + torch.matmul(x, w.transpose(1, 2)).float().sum(0)
    return total.to(x.dtype) if out is None else out.copy_(total)

def old_head(model, h):
    if h.shape[0] > fused.HEAD_ROWS:
        return model.lm_head(model.norm(h))
    return new["head"](model, h)

old = dict(linear=old_linear, swiglu=old_swiglu, down_sum=old_down_sum, head=old_head)
def use(fns):
    for k, f in fns.items():
        setattr(fused, k, f)

out = sys.argv[1]
dev = torch.device("cuda", 0)
model = random_model("llama-7b", torch.bfloat16, dev)
model.backend = "triton"
_warm_up_gpu(dev)
res = {"commit": _commit(), "card": torch.cuda.get_device_name(0)}
with torch.inference_mode():
    for groups in (None, "12-30:2"):
        model.cqil = parse_groups(groups) if groups else CQILConfig()
        for P in (512, 2048):
            ids = torch.randint(0, 32000, (1, P), generator=torch.Generator().manual_seed(0)).to(dev)
            t = {"before": [], "after": []}
            for r in range(4):
                for name, fns in (("before", old), ("after", new))[::1 if r % 2 == 0 else -1]:
                    use(fns)
                    t[name].append(graph_prefill_ms(functools.partial(fused.step, model), model.new_cache, ids, together=False))
            use(new)
            b, a = statistics.median(t["before"]), statistics.median(t["after"])
            key = f"{groups or 'sequential'}_{P}"
            res[key] = dict(times_ms=t, before_median=b, after_median=a)
            print(f"{key}: graph prefill before {b:.3f} ms, after {a:.3f} ms ({100 * (1 - a / b):.1f}% less)", flush=True)
json.dump(res, open(out, "w"), indent=1)
