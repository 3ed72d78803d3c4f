"""Time to first token when prompts come in many lengths, as a server sees them: what the number of prompt
buckets a model keeps (`model.accelerator.prefill_graph_limit`; graphs.MAX_GRAPHS, 64 by default since 8
thrashed here) costs and what it holds. Prompts of lengths drawn log-uniformly from [--min, --max] fall in
up to 52 buckets; a bucket not held runs its next two prompts eagerly (Python launches: ~20 ms for SmolLM2
on the H100 against ~3 ms replayed) and its graph is captured again.

    python benchmarks/prompt_mix.py --shape smollm2-135m --prompts 200 --limit 8 --limit 64 --out mix.json

For each limit: the graphs cleared, one untimed pass over the same lengths (compiles and autotunes every
shape; fills the buckets as far as the limit lets), then the timed pass: `generate(prompt, 1)` per prompt
(prompt in, first token on the host), wall time; median, 90th percentile and mean; the buckets and graphs
held and torch's reserved memory after it. Limits alternate in that order, every round.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch


def prompt_lengths(n: int, low: int, high: int, seed: int = 0) -> list[int]:
    """n lengths drawn log-uniformly from [low, high] (a fixed sequence for a seed)."""
    if not 1 <= low <= high:
        raise ValueError(f"need 1 <= min <= max, got {low}, {high}")
    if n < 1:
        raise ValueError(f"need at least one prompt, got {n}")
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    return [min(high, max(low, round(math.exp(math.log(low) + x * (math.log(high) - math.log(low))))))
            for x in u.tolist()]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def main(argv=None) -> None:
    from cqil_kernels.bench import _commit, _warm_up_gpu, random_model, write_record
    from cqil_kernels.demo import parse_groups
    from cqil_kernels.graphs import bucket

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--groups", default="none", help="CQIL groups as `cqil demo --groups` reads them; none")
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--min", type=int, default=16)
    ap.add_argument("--max", type=int, default=2048)
    ap.add_argument("--limit", type=int, action="append", help="buckets kept; repeated (default 8 and 64)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    lengths = prompt_lengths(a.prompts, a.min, a.max, a.seed)
    if not torch.cuda.is_available():
        raise SystemExit("prompt_mix measures GPU time and needs a CUDA device")
    device, commit = torch.device("cuda"), _commit()
    _warm_up_gpu(device, 1.0)
    model = random_model(a.shape, torch.bfloat16, device)
    model.backend = "triton"
    if a.groups != "none":
        model.cqil = parse_groups(a.groups)
    gen = torch.Generator(device="cpu").manual_seed(a.seed)
    prompts = [torch.randint(0, model.args.vocab_size, (1, T), generator=gen).to(device) for T in lengths]
    limits = a.limit or [8, 64]
    rows, times_all = [], {}
    for r in range(a.rounds):
        for limit in limits:
            model.accelerator.clear_graphs()
            model.accelerator.prefill_graph_limit = limit
            for ids in prompts:  # untimed: compiles, autotunes, fills the buckets the limit lets it keep
                model.generate(ids, 1)
            torch.cuda.synchronize()
            times = []
            for ids in prompts:
                began = time.perf_counter()
                model.generate(ids, 1).cpu()
                times.append(1000 * (time.perf_counter() - began))
            graphs = model.accelerator.graphs
            held, captured = len(graphs.buckets), graphs.captured()
            reserved = torch.cuda.memory_reserved(device) / 2**20
            times_all[f"limit {limit} round {r}"] = times
            rows.append([a.shape, limit, r, round(statistics.median(times), 3), round(percentile(times, 90), 3),
                         round(statistics.mean(times), 3), held, captured, round(reserved)])
            print(f"limit {limit:>3} round {r}: first token median {statistics.median(times):.3f} ms, p90 "
                  f"{percentile(times, 90):.3f}, mean {statistics.mean(times):.3f}; {held} buckets, {captured} "
                  f"graphs held, {reserved:.0f} MiB reserved", flush=True)
    write_record(a.out, device=device, commit=commit,
                 title="Time to first token over prompts of many lengths, by the prompt buckets kept",
                 what=(f"bf16, batch 1, random weights, groups {a.groups}; {a.prompts} prompts of lengths "
                       f"log-uniform in [{a.min}, {a.max}] ({len({bucket(T) for T in lengths})} buckets), seed "
                       f"{a.seed}; generate(prompt, 1) wall time per prompt after an untimed pass"),
                 columns=["shape", "buckets kept", "round", "median ms", "p90 ms", "mean ms", "buckets held",
                          "graphs held", "MiB reserved"],
                 rows=rows, lengths=lengths, times_ms=times_all)


if __name__ == "__main__":
    main()
