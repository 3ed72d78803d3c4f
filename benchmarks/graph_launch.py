"""What a CUDA graph replay costs before the GPU starts (issue 24: can a replayed prompt's wall time come
within 1.10x of its device time?).

    python benchmarks/graph_launch.py --nodes 16 --nodes 256 --nodes 1024 --shape smollm2-135m --rows 64 \\
        --rows 512 --out graph_launch.json

For graphs of N tiny dependent steps on 256 floats (CHAINS: torch adds; Triton adds, with and without the
PDL launch attribute ours use; torch adds with a device copy every 8th: the structures our model graphs
may hold and a chain of torch adds does not), and for the model's own prompt graphs (the
bucket of each --rows length, sequential), the median over --repeats of:
* replay host us: the host's time in `CUDAGraph.replay()`, the GPU idle before it;
* wall us: CUDA events recorded just before and just after the replay, the GPU idle before it: the
  device's view of the replay, its start latency included;
* device us: the same replay queued behind a GPU sleep (the launch hidden);
* wall - device: what the launch adds to the replay's time on the device's clock.
The last row: the same for generate's decode step graph (a token into a kept cache).
The model's rows add the whole forward (model(ids, cache=...) into a kept cache, its Python included:
host us to return, wall us from idle), so that the forward's time before its replay is the forward's
wall - device less the replay's; and for the longest prompt, the host and wall time of each part of a
generate call, alone (the signature check with and without the bindings' scan, the input and argument
checks, the kept slot, the bucket's input copy, the argmax), and of generate(ids, 1) queued and with its
token on the host; and the prompt into a new cache as `cqil bench` times its prefill, whole and by part
(new_cache_parts: where its wall time above the device's goes); and each prompt graph's replay in
five load regimes, with the clock and power NVML saw (replay_regimes: a compute-bound step's device time
depends on what ran before it).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import triton
import triton.language as tl

from cqil_kernels.ops._pdl import release_consumer, wait_for_producer


def from_idle_us(fn, repeats: int, before=None) -> tuple[float, float]:
    """(median host us to return, median wall us between CUDA events around it) of fn() over `repeats` calls,
    the GPU idle before each (before(), if given, runs first, untimed)."""
    host, wall = [], []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(repeats):
        if before is not None:
            before()
        torch.cuda.synchronize()
        start.record()
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e6)
        end.record()
        end.synchronize()
        wall.append(start.elapsed_time(end) * 1e3)
    return statistics.median(host), statistics.median(wall)


def replay_times(graph: torch.cuda.CUDAGraph, repeats: int, before=None) -> dict[str, float]:
    """Median replay host, wall and device us of `graph` (see the module docstring); before() runs ahead of
    every replay, untimed (a prompt graph bound to a cache: the cache's clear, without which each replay
    appends its prompt after the last one's and the third writes past the cache)."""
    from cqil_kernels.bench import device_ms

    host, wall = from_idle_us(graph.replay, repeats, before)
    return {"replay_host_us": host, "wall_us": wall, "device_us": device_ms(graph.replay, repeats, before) * 1e3}


def _clock_and_power() -> tuple[int | None, float | None]:
    """(SM MHz, board W) as NVML last sampled them (over the past 1/6 to 1 s), or Nones where NVML cannot
    be read (no pynvml)."""
    try:
        return torch.cuda.clock_rate(), torch.cuda.power_draw() / 1e3
    except Exception:  # torch raises ModuleNotFoundError without pynvml, NVML's own errors otherwise
        return None, None


def replay_regimes(graph: torch.cuda.CUDAGraph, repeats: int, before=None, seconds: float = 1.0) -> list[list]:
    """[regime, median us per replay, SM MHz, W] of one graph's replay in five load regimes: the GPU's clock
    under a long compute-bound step depends on what ran before (power and heat), so a device time taken in
    one regime and a wall time in another need not compare. Regimes: replays queued `repeats` at a time
    (events between each: the device never idles); from idle, the host synchronising between them (the wall
    time of replay_times); after 0.3 s of host sleep (the GPU idle); behind a 0.2 s GPU sleep
    (bench.device_ms, the device time of replay_times) and behind a 20 ms one. Each regime runs at least
    `repeats` replays and `seconds` of wall time, then NVML's last sample of the clock and power (over the past
    1/6 to 1 s) is read. before(): as replay_times (a bound cache's clear, queued ahead of each replay, outside
    the timed interval)."""
    from cqil_kernels.bench import SLEEP_CYCLES

    def back_to_back() -> list[float]:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        torch.cuda.synchronize()
        for start, end in events:
            if before is not None:
                before()
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) * 1e3 for start, end in events]

    def after(prelude):
        def one() -> list[float]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            prelude()
            if before is not None:
                before()
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            return [start.elapsed_time(end) * 1e3]
        return one

    regimes = (("queued back to back", back_to_back),
               ("from idle, synchronised between", after(torch.cuda.synchronize)),
               ("after 0.3 s of host sleep", after(lambda: (torch.cuda.synchronize(), time.sleep(0.3)))),
               ("behind a 0.2 s GPU sleep", after(lambda: torch.cuda._sleep(SLEEP_CYCLES))),
               ("behind a 20 ms GPU sleep", after(lambda: torch.cuda._sleep(SLEEP_CYCLES // 10))))
    rows = []
    for name, run in regimes:
        times, t0 = [], time.perf_counter()
        while len(times) < repeats or time.perf_counter() - t0 < seconds:
            times.extend(run())
        mhz, watts = _clock_and_power()
        rows.append([name, round(statistics.median(times), 1), mhz, None if watts is None else round(watts)])
    return rows


def replay_row(name: str, t: dict[str, float], nodes: int | None = None, forward: dict | None = None) -> list:
    """A record row (the columns of main) of replay_times' t and, for a model's prompt, forward_times'."""
    return [name, nodes, *(round(t[k], 1) for k in ("replay_host_us", "wall_us", "device_us")),
            round(t["wall_us"] - t["device_us"], 1),
            *((round(forward[k], 1) for k in ("forward_host_us", "forward_wall_us")) if forward else (None, None))]


@triton.jit
def _add_one_kernel(x_ptr, N, BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
    wait_for_producer(USE_GDC)
    offs = tl.arange(0, BLOCK)
    v = tl.load(x_ptr + offs, mask=offs < N)
    release_consumer(USE_GDC)
    tl.store(x_ptr + offs, v + 1, mask=offs < N)


def triton_add(x: torch.Tensor, pdl: bool) -> None:
    """x += 1 by a Triton kernel, launched as ours are: with the PDL attribute (programmatic edges in a
    graph) or without."""
    _add_one_kernel[(1,)](x, x.numel(), BLOCK=triton.next_power_of_2(x.numel()),
                          **({"USE_GDC": True, "launch_pdl": True} if pdl else {"USE_GDC": False}))


# the synthetic graphs: N dependent steps on 256 floats each, which differ in one thing our model graphs
# may hold and a chain of torch adds does not
CHAINS = {
    "adds": lambda x, i: x.add_(1),
    "Triton adds": lambda x, i: triton_add(x, pdl=False),
    "Triton adds, PDL": lambda x, i: triton_add(x, pdl=True),
    # a copy between two tensors: a memcpy node in the graph
    "adds, a copy every 8th": lambda x, i: x[256:].copy_(x[:256]) if i % 8 == 7 else x[:256].add_(1),
}


def chain_graph(kind: str, nodes: int) -> torch.cuda.CUDAGraph:
    """A graph of `nodes` dependent steps of CHAINS[kind] on one small tensor (its first run eager, on a
    side stream: a Triton kernel compiles there)."""
    step = CHAINS[kind]
    x = torch.zeros(512, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(8):
            step(x, i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(nodes):
            step(x, i)
    graph._keep = x  # the buffer the graph writes lives as long as the graph
    return graph


def forward_times(model, ids: torch.Tensor, cache, repeats: int) -> dict[str, float]:
    """Median host us (to return) and wall us (events, from idle) of model(ids, cache=cache), the cache
    cleared before each (a kept cache's prompt: its bucket is bound to it)."""
    host, wall = from_idle_us(lambda: model(ids, cache=cache, logits_to_keep=1), repeats, before=cache.clear)
    return {"forward_host_us": host, "forward_wall_us": wall}


def decode_row(model, shape: str, repeats: int) -> list:
    """The row of generate's decode step graph (a token into a kept cache of 64 positions, cleared before
    each replay: every replay writes position 0), as the prompt graphs' rows."""
    from cqil_kernels.generation import generation_slot

    with generation_slot(model, 1, 64) as (cache, decode):  # let go as generate does: a later generate takes it
        tokens = torch.zeros(1, dtype=torch.long, device=model.device)
        for _ in range(3):  # eager, capture, replay
            cache.clear()
            decode(tokens)
        if decode.graph is None:
            raise SystemExit("the decode step was not captured")
        return replay_row(f"{shape} decode step", replay_times(decode.graph, repeats, before=cache.clear))


def host_parts(model, ids: torch.Tensor, bucket, repeats: int) -> list[list]:
    """[part, median host us, median wall us] of what a generate call does before and after its prompt's
    replay, each part alone from an idle GPU (host: to return; wall: CUDA events around the call), and
    generate(ids, 1) whole: queued, and with the token on the host (its device time included)."""
    from cqil_kernels.generation import check_generate_args, check_inputs, check_inputs_late, generation_slot

    V, T = model.args.vocab_size, ids.shape[1]
    host_ids = ids.cpu()

    def kept_slot():
        """generate's kept cache taken, then let go as generate lets it go (a taken cache is busy: taken again
        without that, every call made a new cache and decode step, as the part timed before 739eb91 did)."""
        with generation_slot(model, 1, T + 1):
            pass
    kept_slot()  # the kept slot that the timed calls take
    logits = torch.zeros(1, V, device=ids.device, dtype=model.dtype)
    parts = [("graph_signature()", model.graph_signature),
             ("graph_signature(scan=False)", lambda: model.graph_signature(scan=False)),
             # one scan of the packed weights' bindings (packed_weights() itself scans them once first)
             ("PackedLayers.is_current()", model.packed_weights().is_current),
             ("check_inputs, ids on the GPU (one read of the device)", lambda: check_inputs(ids, V)),
             ("check_inputs, ids on the host, then copied", lambda: check_inputs(host_ids, V, device=ids.device)),
             # what a prompt's forward does before its replay (an event where the ids are ready), and the same
             # with the check run and read at once (what a forward that cannot read late, e.g. an eager one, costs)
             ("check_inputs_late, ids on the GPU (not read)", lambda: check_inputs_late(ids, V)),
             ("check_inputs_late, ids on the GPU, then read", lambda: check_inputs_late(ids, V)[2].wait()),
             ("check_generate_args, ids on the GPU", lambda: check_generate_args(
                 model.args, model.device, ids, 1, do_sample=False, temperature=1.0, top_k=None, top_p=None,
                 eos_token_id=None, attention_mask=None, generator=None, seed=None)),
             ("generation_cache, a kept slot (signature + clear)", kept_slot),
             ("the bucket's input copy (ids + length)", lambda: bucket.load(ids, None)),
             ("model.argmax of one row of logits", lambda: model.argmax(logits)),
             ("generate(ids, 1), queued", lambda: model.generate(ids, 1)),
             ("generate(ids, 1), the token on the host", lambda: model.generate(ids, 1).tolist())]
    return [[name, *(round(t, 1) for t in from_idle_us(fn, repeats))] for name, fn in parts]


def new_cache_parts(model, ids: torch.Tensor, repeats: int) -> list[list]:
    """[part, median host us, median wall us, median device us] of a prompt forward into a new cache, as
    `cqil bench` times its prefill (new_cache + model(ids, cache=...): the prompt's bucket runs into its own
    scratch, whose positions copy_prompt then hands over, and the logits of every position are cloned out of
    the graph's pool), and of its parts alone: new_cache; the scratch bucket's replay; copy_prompt; the
    logits' clone (device: queued behind a GPU sleep; None where the part is host work only)."""
    from cqil_kernels.bench import device_ms

    B, T = ids.shape
    # cqil bench's cache: the prompt, 64 new tokens and 2 more (within the model's positions)
    length = min(T + 66, model.args.max_position_embeddings)

    def bench_form():
        model(ids, cache=model.new_cache(B, length))

    for _ in range(3):  # eager, capture, replay
        bench_form()
    buckets = [b for b in model.accelerator.graphs.buckets.values() if b.graph is not None and b.target is None]
    if len(buckets) != 1:
        raise SystemExit(f"expected one scratch bucket for {T} tokens, found {len(buckets)}")
    entry = buckets[0]
    full = model.new_cache(B, length)
    logits = entry.replay_or_run(lambda: None)  # a replay: the graph's output (the padded step's logits)
    rows = [["forward into a new cache (bench's prefill)", *from_idle_us(bench_form, repeats), None],
            ["new_cache", *from_idle_us(lambda: model.new_cache(B, length), repeats), None],
            ["the scratch bucket's replay", *from_idle_us(entry.graph.replay, repeats),
             device_ms(entry.graph.replay, repeats) * 1e3],
            ["copy_prompt", *from_idle_us(lambda: full.copy_prompt(entry.scratch, T), repeats, before=full.clear),
             device_ms(lambda: full.copy_prompt(entry.scratch, T), repeats, before=full.clear) * 1e3],
            ["the logits' clone", *from_idle_us(lambda: logits[:, :T].clone(), repeats),
             device_ms(lambda: logits[:, :T].clone(), repeats) * 1e3]]
    return [[name, *(None if t is None else round(t, 1) for t in times)] for name, *times in rows]


def main(argv=None) -> None:
    from cqil_kernels.bench import _commit, _warm_up_gpu, random_model, write_record

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", action="append", type=int, help="kernels per synthetic graph (default 16 256 1024)")
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--rows", action="append", type=int, help="prompt lengths of the model's graphs (default 64 512)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("graph_launch measures CUDA graph launches and needs a CUDA device")
    if a.repeats < 1 or min(a.nodes or [1]) < 1 or min(a.rows or [1]) < 1:
        raise SystemExit("nodes, rows and repeats must be >= 1")
    device, commit = torch.device("cuda"), _commit()
    _warm_up_gpu(device, 2.0)
    rows, regimes = [], {}
    for kind in CHAINS:
        for n in a.nodes or [16, 256, 1024]:
            graph = chain_graph(kind, n)
            graph.replay()
            rows.append(replay_row(f"{n} {kind}", replay_times(graph, a.repeats), nodes=n))
            print(rows[-1], flush=True)
    model = random_model(a.shape, torch.bfloat16, device)
    with torch.inference_mode():
        for T in a.rows or [64, 512]:
            ids = torch.randint(0, model.args.vocab_size, (1, T), device=device)
            cache = model.new_cache(1, min(2 * T, model.args.max_position_embeddings))
            cache.long_lived = True  # as generate's kept cache: the prompt's bucket binds to it
            for _ in range(3):  # eager, capture, replay
                cache.clear()
                model(ids, cache=cache, logits_to_keep=1)
            buckets = [b for b in model.accelerator.graphs.buckets.values() if b.graph is not None
                       and b.target is not None and b.target() is cache]
            if len(buckets) != 1:
                raise SystemExit(f"expected one graph bound to the cache for {T} tokens, found {len(buckets)}")
            rows.append(replay_row(f"{a.shape} prompt {T}",
                                   replay_times(buckets[0].graph, a.repeats, before=cache.clear),
                                   forward=forward_times(model, ids, cache, a.repeats)))
            print(rows[-1], flush=True)
            regimes[T] = replay_regimes(buckets[0].graph, a.repeats, before=cache.clear)
            for name, us, mhz, watts in regimes[T]:
                print(f"  {name:40s} {us:10.1f} us per replay   SM {mhz} MHz   {watts} W", flush=True)
            if T == max(a.rows or [64, 512]):
                parts = host_parts(model, ids, buckets[0], a.repeats)
                for part in parts:
                    print(f"  {part[0]:55s} host {part[1]:8.1f} us  wall {part[2]:8.1f} us", flush=True)
                fresh = new_cache_parts(model, ids, a.repeats)
                for name, host, wall, dev in fresh:
                    print(f"  {name:55s} host {host:8.1f} us  wall {wall:8.1f} us  device {dev} us", flush=True)
        rows.append(decode_row(model, a.shape, a.repeats))
        print(rows[-1], flush=True)
    columns = ["graph", "kernels (synthetic)", "replay host us", "replay wall us", "replay device us",
               "replay wall - device us", "forward host us", "forward wall us"]
    print(columns)
    if a.out:
        write_record(a.out, device=device, commit=commit,
                     title="What a CUDA graph replay costs before the GPU starts",
                     what=f"median of {a.repeats}; see benchmarks/graph_launch.py's docstring. Synthetic graphs: "
                          f"N dependent steps of each kind (CHAINS) on 256 floats; model graphs: {a.shape}, bf16, "
                          "sequential, batch 1, the prompt bucket bound to a kept cache", columns=columns, rows=rows,
                     host_parts=dict(what=f"{a.shape}, a prompt of {max(a.rows or [64, 512])} tokens: median host us "
                                          "of each part alone, the GPU idle before each (host: to return; "
                                          "wall: CUDA events around it)", columns=["part", "host us", "wall us"],
                                     rows=parts),
                     new_cache_parts=dict(what=f"{a.shape}, a prompt of {max(a.rows or [64, 512])} tokens into a new "
                                               "cache of 66 positions more, as cqil bench's prefill: median host, "
                                               "wall (from idle) and device us (queued behind a GPU sleep) of the "
                                               "forward and of each part alone (new_cache_parts)",
                                          columns=["part", "host us", "wall us", "device us"], rows=fresh),
                     regimes=dict(what="each model prompt graph's replay in five load regimes (replay_regimes): "
                                       "median us per replay, then the SM clock and board power NVML sampled after "
                                       "~1 s more of the same regime", columns=["regime", "us per replay", "SM MHz",
                                                                               "W"],
                                  rows={str(T): r for T, r in regimes.items()}))


if __name__ == "__main__":
    main()
