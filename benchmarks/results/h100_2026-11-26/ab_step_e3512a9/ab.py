"""Same-process A/B of this session's step changes: variants swapped into cqil_kernels.fused, rounds
alternated so drift hits every variant alike. Prints medians per variant."""
import json
import statistics
import sys

import torch

import cqil_kernels.fused as fused
from cqil_kernels import CQILConfig, CQILLlama
from cqil_kernels.bench import DEFAULT_GROUPS, _time_ours, _warm_up_gpu, random_hf_model
from cqil_kernels.demo import parse_groups
from cqil_kernels.ops.group_gemm import group_down_sum, group_swiglu
from cqil_kernels.ops.group_residual import group_residual

NEW = (fused.advance, fused.head, fused.stage_forward)


def old_advance(cache, valid, T):
    B = cache.key_valid.shape[0]
    dev = cache.key_valid.device
    if valid is None:
        valid = torch.ones(B, T, dtype=torch.bool, device=dev)
    cache.start.copy_(cache.position)
    slots = cache.position.long() + torch.arange(T, device=dev)
    cache.key_valid.index_copy_(1, slots, valid)
    positions = (cache.n_tokens[:, None] + valid.long().cumsum(1) - 1).clamp(min=0)
    cache.n_tokens += valid.long().sum(1)
    cache.position += T
    return positions


def old_head(model, h):
    return model.lm_head(model.norm(h))


def old_stage(w, h, positions, k_cache, v_cache, key_valid, start, inv_freq, *, args, bypass, bypass_mode):
    P = w.qkv.shape[0]
    a = fused.stage_attention(w, h, positions, k_cache, v_cache, key_valid, start, inv_freq, args=args)
    xn, residual = group_residual(h, a, w.norm_post, eps=args.rms_norm_eps, bypass=bypass if P > 1 else 0,
                                  bypass_mode=bypass_mode)
    act = group_swiglu(xn, w.gate, w.up, bias_gate=w.gate_bias, bias_up=w.up_bias)
    return group_down_sum(act, w.down, residual, bias=w.down_bias)


VARIANTS = {"old": (old_advance, old_head, old_stage), "new": NEW, "new-nofold": (NEW[0], NEW[1], old_stage)}

shape, rounds = sys.argv[1], int(sys.argv[2])
hf = random_hf_model(shape, torch.bfloat16, torch.device("cuda"))
model = CQILLlama.from_pretrained(hf)
del hf
ids = torch.randint(0, model.args.vocab_size, (1, 512), device="cuda")
_warm_up_gpu(torch.device("cuda"), 2.0)
res = {}
for r in range(rounds):
    for grouping in (["cqil", "seq"] if shape.startswith("smol") else ["seq"]):
        model.cqil = parse_groups(DEFAULT_GROUPS[shape]) if grouping == "cqil" else CQILConfig()
        for name in (VARIANTS if r % 2 == 0 else reversed(list(VARIANTS))):
            fused.advance, fused.head, fused.stage_forward = VARIANTS[name]
            pre, dec = _time_ours(model, ids, 64, 3)
            res.setdefault(f"{grouping}/{name}", []).append(dec)
            print(r, grouping, name, round(dec, 4), round(pre, 3), flush=True)
summary = {k: dict(median=round(statistics.median(v), 4), runs=[round(x, 4) for x in v]) for k, v in res.items()}
print(json.dumps(summary, indent=1))
json.dump(dict(card=torch.cuda.get_device_name(), shape=shape, summary=summary), open(sys.argv[3], "w"), indent=1)
