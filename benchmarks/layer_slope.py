"""The fixed cost of one layer step in our decode (issue 26's slope method): a decode step of a model with
L2 layers minus one with L1 layers of the same width, divided by L2 - L1, is one layer's step time with
everything outside the layers (embedding, final norm, lm_head, argmax, graph launch) cancelled. What the
step takes beyond streaming its bytes at the device-to-device copy bandwidth of the same run is the layer's
fixed cost: launches, ramp-up, tail, the dependent kernel's wait.

    python benchmarks/layer_slope.py --shape llama-7b --tp 1 --tp 2 --tp 4 --layers 2 --layers 10 \\
        --out slope.json

--tp T: the layer one rank of T-way tensor parallelism runs (heads and intermediate size divided by T,
hidden size kept), built as a model of its own: the shard's compute without the all-reduce.
Sequential decode (no groups), bf16, batch --batch, --prompt cached positions, graph-replayed as in
cqil bench; models of one --tp alternate, order reversed every other round; medians.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch


def shard_overrides(shape: str, tp: int, layers: int) -> dict:
    """Config fields of the layer a rank of tp-way tensor parallelism holds, as a model of `layers`."""
    from cqil_kernels.bench import shape_args

    args = shape_args(shape)
    H, Hkv, F = args.num_attention_heads, args.num_key_value_heads, args.intermediate_size
    if H % tp or Hkv % tp or F % tp:
        raise SystemExit(f"{shape}: {H} heads, {Hkv} KV heads and intermediate size {F} must divide by tp={tp}")
    return dict(num_hidden_layers=layers, num_attention_heads=H // tp, num_key_value_heads=Hkv // tp,
                intermediate_size=F // tp, head_dim=args.head_dim)


@torch.inference_mode()
def main(argv=None) -> None:
    from cqil_kernels import CQILConfig
    from cqil_kernels.bench import (_commit, _time_ours, _warm_up_gpu, copy_bandwidth_gbps, decode_step_bytes,
                                    random_model, shape_args, write_record)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-7b")
    ap.add_argument("--tp", type=int, action="append", help="shard shapes (default 1)")
    ap.add_argument("--layers", type=int, action="append", help="two layer counts (default 2 and 10)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=64, help="decode steps timed per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    lo, hi = sorted(a.layers or [2, 10])
    if len(a.layers or [2, 10]) != 2 or lo < 1 or hi <= lo:
        raise SystemExit("--layers: two different counts >= 1")
    if not torch.cuda.is_available():
        raise SystemExit("layer_slope measures GPU time and needs a CUDA device")
    device, dtype, commit = torch.device("cuda"), torch.bfloat16, _commit()
    _warm_up_gpu(device, 1.0)
    copy = copy_bandwidth_gbps(device)
    rows, times_all = [], {}
    for tp in a.tp or [1]:
        models, step_bytes = {}, {}
        for n in (lo, hi):
            over = shard_overrides(a.shape, tp, n)
            models[n] = random_model(a.shape, dtype, device, **over)
            models[n].cqil, models[n].backend = CQILConfig(), "triton"
            step_bytes[n] = decode_step_bytes(shape_args(a.shape, **over), dtype, a.batch, a.prompt)
        ids = torch.randint(0, models[lo].args.vocab_size, (a.batch, a.prompt), device=device)
        times = {n: [] for n in models}
        for r in range(a.rounds):
            for n in ((lo, hi) if r % 2 == 0 else (hi, lo)):
                times[n].append(_time_ours(models[n], ids, a.new, a.repeats)[1])
                print(f"tp {tp} round {r} {n:>3} layers: {times[n][-1]:.4f} ms/token", flush=True)
        del models
        torch.cuda.empty_cache()
        t_lo, t_hi = statistics.median(times[lo]), statistics.median(times[hi])
        slope_us = (t_hi - t_lo) / (hi - lo) * 1000
        layer_bytes = (step_bytes[hi] - step_bytes[lo]) / (hi - lo)
        floor_us = layer_bytes / copy / 1e3
        rows.append([tp, round(t_lo, 4), round(t_hi, 4), round(slope_us, 2), round(layer_bytes / 1e6, 2),
                     round(floor_us, 2), round(slope_us - floor_us, 2), round(100 * floor_us / slope_us, 1)])
        times_all[str(tp)] = {str(n): t for n, t in times.items()}
        print(f"tp {tp}: layer step {slope_us:.2f} us for {layer_bytes / 1e6:.1f} MB ({floor_us:.2f} us at copy "
              f"speed): fixed cost {slope_us - floor_us:.2f} us ({100 * floor_us / slope_us:.0f}% of copy)",
              flush=True)
    write_record(
        a.out, device=device, commit=commit,
        title=f"Per-layer fixed cost of our decode step (slope method): {a.shape}",
        what=(f"sequential decode, bf16, batch {a.batch}, {a.prompt} cached positions, graph-replayed "
              f"(cqil_kernels.bench._time_ours, {a.new} steps x {a.repeats} repeats); models of {lo} and {hi} "
              f"layers alternated over {a.rounds} rounds, medians; tp T: heads and intermediate size / T"),
        copy_gbps=round(copy, 1),
        columns=["tp", f"ms/token at {lo} layers", f"ms/token at {hi} layers", "us per layer step",
                 "MB per layer", "us at copy speed", "fixed cost us", "% of copy"],
        rows=rows, times_ms=times_all)


if __name__ == "__main__":
    main()
