"""Issue 26's one-launch decode attention against today's two launches, in one process: the decode step with
rope_kv_write + group_attention per stage (fused.stage_attention as it is) against the same step whose
T = 1 stages call ops.attention.decode_attention (RoPE, the cache write and attention in one launch),
alternated round by round (order reversed every other round), each measured as `cqil bench` measures decode
(64 greedy tokens after a 512-token prompt, CUDA graph, argmax included). Before timing, the greedy tokens of
both are compared (they must be equal, or the record says where they part).

    python benchmarks/decode_attention_ab.py --shape smollm2-135m --shape llama-7b --groups none --rounds 4 \\
        --out decode_attention_ab.json

The one-launch form replaces stage_attention only inside this script (a prototype measured before the fused
backend takes it, as issue 26 asks).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import torch


def one_launch_stage_attention(original):
    """fused.stage_attention with decode_attention for one new token per row (else `original`)."""
    from cqil_kernels import fused
    from cqil_kernels.ops.attention import decode_attention

    def stage_attention(w, h, positions, k_cache, v_cache, key_valid, start, inv_freq, *, args, residual=None):
        if positions.shape[1] != 1:
            return original(w, h, positions, k_cache, v_cache, key_valid, start, inv_freq, args=args,
                            residual=residual)
        P, B, H, Dh = w.qkv.shape[0], positions.shape[0], args.num_attention_heads, args.head_dim
        qkv = fused.linear(h, w.qkv, norm_weight=w.norm_in, eps=args.rms_norm_eps, bias=w.qkv_bias)
        attn = decode_attention(qkv, positions, inv_freq, k_cache, v_cache, key_valid, start, num_heads=H)
        return fused.linear(attn.view(P, B, H * Dh), w.o, bias=w.o_bias, residual=residual)

    return stage_attention


@contextlib.contextmanager
def variant(name: str):
    """The fused backend's decode as `name` ("two launches": as it is; "one launch": decode_attention)."""
    from cqil_kernels import fused

    original = fused.stage_attention
    if name == "one launch":
        fused.stage_attention = one_launch_stage_attention(original)
    try:
        yield
    finally:
        fused.stage_attention = original


VARIANTS = ("two launches", "one launch")


def main(argv=None) -> None:
    from cqil_kernels import CQILConfig
    from cqil_kernels.bench import DEFAULT_GROUPS, _commit, _time_ours, _warm_up_gpu, random_model, write_record
    from cqil_kernels.demo import parse_groups

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", help="model shapes (default smollm2-135m)")
    ap.add_argument("--groups", default="none", help="'none' (sequential, default) or 'default' (the shape's groups)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("decode_attention_ab measures GPU latency and needs a CUDA device")
    if a.rounds < 1 or a.batch < 1 or a.prompt < 1:
        raise SystemExit("rounds, batch and prompt must be >= 1")
    device, commit = torch.device("cuda"), _commit()
    _warm_up_gpu(device, 2.0)
    rows = []
    for shape in a.shape or ["smollm2-135m"]:
        model = random_model(shape, torch.bfloat16, device)
        groups = DEFAULT_GROUPS[shape] if a.groups == "default" else a.groups
        model.cqil = CQILConfig() if groups == "none" else parse_groups(groups)
        ids = torch.randint(0, model.args.vocab_size, (a.batch, a.prompt), device=device)
        with torch.inference_mode():
            tokens = {}
            for name in VARIANTS:
                with variant(name):
                    model.accelerator.clear_graphs()
                    tokens[name] = model.generate(ids, 32)[:, a.prompt:].cpu()
            equal = torch.equal(*tokens.values())
            parted = None if equal else int((tokens[VARIANTS[0]] != tokens[VARIANTS[1]]).any(0).nonzero()[0])
            print(f"{shape} {groups}: greedy tokens equal: {equal}" + ("" if equal else f" (part at {parted})"))
            runs: dict[str, list[float]] = {name: [] for name in VARIANTS}
            for r in range(a.rounds):
                for name in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
                    with variant(name):
                        _, decode_ms = _time_ours(model, ids, 64, 3)
                    runs[name].append(round(decode_ms, 4))
                    print(f"{shape} round {r} {name:>12}: {decode_ms:.4f} ms/token", flush=True)
        base = statistics.median(runs[VARIANTS[0]])
        for name in VARIANTS:
            median = statistics.median(runs[name])
            rows.append([shape, groups, a.batch, name, round(median, 4), round(1e3 * (base - median), 1),
                         runs[name], "yes" if equal else f"no, from token {parted}"])
        model.accelerator.clear_graphs()
        del model
        torch.cuda.empty_cache()
    columns = ["shape", "groups", "batch", "variant", "decode ms/token (median)", "saved us/token", "rounds",
               "greedy tokens equal"]
    for row in rows:
        print(row)
    if a.out:
        write_record(a.out, device=device, commit=commit,
                     title="Decode with RoPE and the cache write inside the attention launch (issue 26)",
                     what=f"benchmarks/decode_attention_ab.py: bf16, random weights, batch {a.batch}, "
                          f"{a.prompt}-token prompt, 64 greedy tokens (CUDA graph, argmax included), {a.rounds} "
                          "alternated rounds, median", columns=columns, rows=rows)


if __name__ == "__main__":
    main()
