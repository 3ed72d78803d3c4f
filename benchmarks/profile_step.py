"""Where a prefill and a decode step spend their time: torch.profiler over our model on the GPU.

    python benchmarks/profile_step.py --shape smollm2-135m --groups 2-26:4 [--prompt 512] [--batch 1]
Prints host (CPU) and device time of one eager prefill, the host's Python time of a prompt replayed from
its bucket's CUDA graph (cProfile over repeated calls, the device idle before each: the host work that
stands between a user's call and the first kernel), the per-kernel device time of decode steps
replayed from the CUDA graph with their timeline (kernel_timeline: each kernel's own time past the one before
it, and the device's idle time before it: issue 26's "where the gaps are"; kernel_sequence: the same for each
launch of a step in order, which tells a layer's four GEMMs apart), and the wall time and host Python
of whole generate calls.
"""

import argparse
import cProfile
import pstats
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from cqil_kernels import CQILConfig, CQILLlama
from cqil_kernels.bench import DEFAULT_GROUPS, random_hf_model, ttft_ms
from cqil_kernels.demo import parse_groups
from cqil_kernels.model import check_forward_inputs


def host_profile(call, times: int) -> tuple[float, cProfile.Profile]:
    """(median wall ms of call(), a cProfile of every call) over `times` calls, the device idle before each."""
    profiler, walls = cProfile.Profile(), []
    for _ in range(times):
        torch.cuda.synchronize()
        start = time.perf_counter()
        profiler.enable()
        call()
        profiler.disable()
        walls.append(time.perf_counter() - start)
    return 1e3 * statistics.median(walls), profiler


def _own_and_idle(kernels):
    """kernels: (name, start us, end us) of device activities, in any order -> (name, duration, own, idle) of
    each in start order. Own: the part of a kernel after every earlier activity has ended (with programmatic
    dependent launch a kernel starts, and waits, while the one before it finishes: its duration counts that
    wait, its own time does not); idle: the device doing nothing between the end of everything before and its
    start. Own and idle times add up to the whole span."""
    end_so_far = None
    for name, start, end in sorted(kernels, key=lambda k: k[1]):
        begin = start if end_so_far is None else max(start, end_so_far)
        idle = 0.0 if end_so_far is None else max(0.0, start - end_so_far)
        yield name, end - start, max(0.0, end - begin), idle
        end_so_far = end if end_so_far is None else max(end_so_far, end)


def kernel_timeline(kernels) -> list[list]:
    """kernels: (name, start us, end us) of every device activity, in any order -> per name [name, count,
    mean us, mean own us, mean idle us before it] (_own_and_idle), by total own time."""
    stats: dict[str, list] = {}
    for name, duration, own, idle in _own_and_idle(kernels):
        entry = stats.setdefault(name, [0, 0.0, 0.0, 0.0])
        entry[0] += 1
        entry[1] += duration
        entry[2] += own
        entry[3] += idle
    return [[name, n, total / n, own / n, idle / n]
            for name, (n, total, own, idle) in sorted(stats.items(), key=lambda item: -item[1][2])]


def kernel_sequence(kernels, steps: int) -> list[list]:
    """kernels: (name, start us, end us) of every device activity of `steps` steps that each launch the same
    kernels in the same order -> per launch of a step, in order: [name, mean own us, mean idle us before it]
    (_own_and_idle). ValueError where the steps' launches differ."""
    if not steps or len(kernels) % steps:
        raise ValueError(f"{len(kernels)} device activities are not {steps} steps of one launch sequence")
    per_step = len(kernels) // steps
    rows = []
    for i, (name, _, own, idle) in enumerate(_own_and_idle(kernels)):
        if i < per_step:
            rows.append([name, 0.0, 0.0])
        row = rows[i % per_step]
        if row[0] != name:
            raise ValueError(f"launch {i % per_step} of a step is {row[0]} in the first step, {name} in another")
        row[1] += own / steps
        row[2] += idle / steps
    return rows


def _device_kernels(prof) -> list[tuple[str, float, float]]:
    """(name, start us, end us) of a torch.profiler profile's device activities."""
    return [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA]


def print_timeline(prof, steps: int, layers: int) -> None:
    """kernel_timeline of a profile's device activities, per step and per layer step."""
    kernels = _device_kernels(prof)
    rows = kernel_timeline(kernels)
    print(f"== their timeline ({len(kernels)} device activities; us; own: past every earlier activity's end, idle: "
          f"the device idle before it):")
    print(f"  {'kernel':60s} {'per step':>8} {'mean':>8} {'own':>8} {'idle':>8} {'own+idle per step':>18}")
    for name, n, mean, own, idle in rows:
        print(f"  {name[:60]:60s} {n / steps:8.1f} {mean:8.2f} {own:8.2f} {idle:8.2f} {n * (own + idle) / steps:18.1f}")
    own = sum(n * o for _, n, _, o, _ in rows) / steps
    idle = sum(n * i for _, n, _, _, i in rows) / steps
    print(f"  per step: {own:.1f} us own + {idle:.1f} us idle; per layer step: {(own + idle) / layers:.2f} us")


def print_sequence(prof, steps: int, first: int) -> None:
    """The first `first` launches of a step in order (kernel_sequence), then the step's last five."""
    rows = kernel_sequence(_device_kernels(prof), steps)
    print(f"== a step's launches in order ({len(rows)} a step; mean us over {steps} steps):")
    print(f"  {'#':>4} {'kernel':60s} {'own':>8} {'idle':>8}")
    for i, (name, own, idle) in enumerate(rows):
        if i < first or i >= len(rows) - 5:
            print(f"  {i:4d} {name[:60]:60s} {own:8.2f} {idle:8.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--groups", default=None, help="'none' for sequential")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--rows", type=int, default=14)
    ap.add_argument("--new", type=int, default=64, help="tokens of the profiled generate calls")
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args()
    if a.batch < 1 or a.prompt < 1:
        raise SystemExit(f"--batch and --prompt must be >= 1, got {a.batch} and {a.prompt}")
    groups = a.groups or DEFAULT_GROUPS[a.shape]
    model = CQILLlama.from_pretrained(random_hf_model(a.shape, torch.bfloat16, torch.device("cuda")))
    model.cqil = CQILConfig() if groups == "none" else parse_groups(groups)
    ids = torch.randint(0, model.args.vocab_size, (a.batch, a.prompt), device="cuda")
    cache_len = a.prompt + 40
    with torch.inference_mode():
        model.accelerator.prefill_graphs = False  # first the prompt launched from Python
        for _ in range(2):
            model(ids, cache=model.new_cache(a.batch, cache_len))
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model(ids, cache=model.new_cache(a.batch, cache_len))
            torch.cuda.synchronize()
        print(f"== eager prefill {a.batch} x {a.prompt} tokens, groups {groups}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=a.rows))

        model.accelerator.prefill_graphs = True
        for _ in range(3):  # eager padded, captured, replayed
            model(ids, cache=model.new_cache(a.batch, cache_len), logits_to_keep=1)
        ms, profiler = host_profile(lambda: model(ids, cache=model.new_cache(a.batch, cache_len), logits_to_keep=1), 20)
        print(f"== prompt replayed from its graph: host {ms:.3f} ms per call (median of 20, the device idle "
              f"before each); cProfile over the 20 calls (its own overhead included):")
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(a.rows)
        stats.sort_stats("cumulative").print_stats(a.rows)
        stats.sort_stats("tottime").print_callers(6)
        print("== the replayed prompt's host time by part (median ms of 20 calls, the device idle before each):")
        kept = model.new_cache(a.batch, cache_len)
        kept.long_lived = True  # generate's kind of cache: the prompt's graph binds to it (no scratch, no copy)
        parts = {
            "new_cache": lambda: model.new_cache(a.batch, cache_len),
            "check_inputs": lambda: check_forward_inputs(model, ids, None, kept),
            "forward into a new cache (scratch + copy)": lambda: model(ids, cache=model.new_cache(a.batch, cache_len),
                                                                       logits_to_keep=1),
            "forward into a kept cache (bound)": lambda: (kept.clear(), model(ids, cache=kept, logits_to_keep=1)),
            "generate(ids, 1), token on the host": lambda: model.generate(ids, 1).cpu(),
        }
        for name, call in parts.items():
            for _ in range(2):  # and ttft_ms's own warm-up call
                call()
            print(f"  {name:45s} {ttft_ms(call, 20):8.3f}")

        cache = model.new_cache(a.batch, cache_len)
        tok = model.argmax(model(ids, cache=cache)[:, -1])
        decode = model.decoder(cache, check_tokens=False)  # its own tokens, as generate's steps
        for _ in range(3):
            tok = model.argmax(decode(tok))
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                tok = model.argmax(decode(tok))
            torch.cuda.synchronize()
        print(f"== 10 decode steps (CUDA graph), groups {groups}")
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=a.rows))
        print_timeline(prof, 10, len(model.stages))
        print_sequence(prof, 10, 24)

        for _ in range(3):  # the kept cache's decode graph captured (graphs.DecodeSlots), the prompt's replayed
            model.generate(ids, a.new)
        ms, profiler = host_profile(lambda: model.generate(ids, a.new).cpu(), 5)
        print(f"== generate({a.prompt} tokens, {a.new} new): {ms:.3f} ms per call (median of 5, tokens on the "
              f"host); cProfile over the 5 calls (its own overhead included):")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(a.rows)


if __name__ == "__main__":
    main()
