"""`cqil bench`: end-to-end prefill and decode latency, transformers eager vs ours, on one GPU.

Variants (same random weights, same dtype, same prompt):
    hf-eager       transformers LlamaForCausalLM, eager, DynamicCache: what users run today
    hf-compiled    transformers with a StaticCache and its forward compiled by
                   torch.compile(mode="reduce-overhead", fullgraph=True): what transformers documents for
                   fast decode (one compiled graph for the prompt's length, one for a decode step)
    torch          our torch backend (model.py), no groups, eager
    triton-seq     our Triton backend, no groups, decode replayed from a CUDA graph
    triton-cqil    our Triton backend with the CQIL groups, decode replayed from a CUDA graph
Decode is timed with CUDA events over `new` greedy steps after a `prompt`-token prefill, argmax included
(ours: fused.greedy, one Triton launch; HF: torch.argmax, as HF users run it), median of
`repeats` runs; prefill is the median of max(repeats, 10) prompt forwards into a fresh cache,
timed after the decode runs (the GPU is warmed up for a second before anything is timed); on CUDA our
Triton variants replay the prompt's length bucket from a CUDA graph (graphs.py). For them the record
also gives the prefill with the graphs off (prefill_eager_ms), its device time (the step queued behind
a GPU sleep: the full clock), its device time under load (prefill_loaded_device_ms: replayed back to back,
where a compute-bound prompt runs at the lower clock of a GPU at its power limit, as the timed prefills
do), the prefill after the GPU rested (prefill_rested_ms) and the host's time to enqueue each form:
prefill_split_ms. Time to first token (ttft_ms) is what a user of
generate waits for: the prompt in, the first greedy token on the host (our generate(ids, 1), which feeds
the prompt in parts of generate's prefill_chunk with the last position's logits only; transformers'
generate(ids, max_new_tokens=1)), wall clock, the median of max(repeats, 10) after one warm-up call.
Achieved bandwidth counts every byte a decode step must read (all weights once, the KV cache so far) and
is reported against a device-to-device copy measured in the same run.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import envs
from .config import CQILConfig, LlamaArgs

SHAPES = {  # published configs; weights are random
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                     rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "llama-33b": dict(vocab_size=32000, hidden_size=6656, intermediate_size=17920, num_hidden_layers=60,
                      num_attention_heads=52, num_key_value_heads=52, max_position_embeddings=2048,
                      rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=8192,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
}
DEFAULT_GROUPS = {"llama-7b": "4-28:4", "llama-33b": "10-50:4", "smollm2-135m": "2-26:4", "llama-3.2-1b": "2-14:2"}
VARIANTS = ("hf-eager", "hf-compiled", "torch", "triton-seq", "triton-cqil")


class _Timer:
    """Milliseconds between start() and stop(): CUDA events where CUDA is up, else the wall clock (a CPU
    run, where the work is done when the calls return: the multi-process benchmarks' CPU tests)."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()

    def start(self) -> None:
        if self.cuda:
            self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.begin = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            return self.begin.elapsed_time(self.end)
        return 1e3 * (time.perf_counter() - self.begin)


def _events_ms(fn, repeats: int) -> float:
    """Median milliseconds of fn() over `repeats` runs, timed with CUDA events (the wall clock without CUDA),
    after one warm-up."""
    fn()
    times = []
    timer = _Timer()
    for _ in range(repeats):
        timer.start()
        fn()
        times.append(timer.stop())
    return statistics.median(times)


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + bytes written per second), GB/s."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _events_ms(lambda: dst.copy_(src), 20)
    return 2 * nbytes / ms / 1e6


def random_hf_model(shape: str, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """transformers LlamaForCausalLM with the published config of `shape` and random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**SHAPES[shape], torch_dtype=dtype)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    return model


def shape_args(shape: str, **overrides) -> LlamaArgs:
    """The LlamaArgs of one of SHAPES, with config fields replaced by `overrides` (num_hidden_layers=2)."""
    return LlamaArgs.from_hf({"model_type": "llama", **SHAPES[shape], **overrides})


@torch.no_grad()
def random_model(shape: str, dtype: torch.dtype, device: torch.device, seed: int = 0, held_layers=None,
                 placement=None, **overrides):
    """CQILLlama with the published config of `shape` and random weights (std 0.02, norms 1), built
    directly on `device` layer by layer: no transformers model, no second copy. held_layers: only these
    layers (the others stay on "meta"); placement: a parallel.Placement, whose layers are held as its
    shards (a rank of a multi-GPU run). Layer l's weights depend only on (seed, l), so every rank and a
    one-GPU model built with the same seed hold the same weights. overrides: config fields replaced
    (shape_args)."""
    from .llama import CQILLlama

    args = shape_args(shape, **overrides)
    if placement is not None:
        held_layers = placement.held_layers
    with torch.device("meta"):
        model = CQILLlama(args, held_layers=held_layers,
                          layer_args=None if placement is None else (lambda l: placement.layer_args(l, args)))
    model.pack(device, dtype, copy=False)
    full = None
    if placement is not None:  # the full tensors' shapes, whose shards this process holds
        with torch.device("meta"):
            full = {name: p.shape for name, p in CQILLlama(args).named_parameters()}

    def fill(prefix: str, module, key: int) -> None:
        g = torch.Generator(device=device).manual_seed(seed * 100_003 + key)
        for name, p in module.named_parameters(recurse=False):
            if p.is_meta:
                setattr(module, name, torch.nn.Parameter(torch.empty(p.shape, device=device, dtype=dtype),
                                                         requires_grad=False))
                p = getattr(module, name)
            qualified = f"{prefix}{name}"
            shape = full[qualified] if full is not None else p.shape
            value = (torch.ones(shape, device=device, dtype=dtype) if name == "weight" and len(shape) == 1
                     else torch.empty(shape, device=device, dtype=dtype).normal_(0.0, 0.02, generator=g))
            p.copy_(placement.take(qualified, value) if placement is not None else value)

    for l in (range(args.num_hidden_layers) if held_layers is None else model.held_layers):
        for i, (name, module) in enumerate(model.layers[l].named_modules()):
            fill(f"layers.{l}.{name}." if name else f"layers.{l}.", module, 10 * l + i)
    fill("embed_tokens.", model.embed_tokens, -1)
    fill("norm.", model.norm, -2)
    if not args.tie_word_embeddings:
        fill("lm_head.", model.lm_head, -3)
    else:
        model.lm_head.weight = model.embed_tokens.weight
    model.reset_rope()
    return model.eval()


def decode_step_bytes(args: LlamaArgs, dtype: torch.dtype, batch: int, seq: int) -> int:
    """Bytes one decode step must read: every weight once (the embedding: one row per sequence) plus
    the keys and values of `seq` cached positions in every layer."""
    D, F, L = args.hidden_size, args.intermediate_size, args.num_hidden_layers
    H, Hkv, Dh = args.num_attention_heads, args.num_key_value_heads, args.head_dim
    per_layer = D * (H + 2 * Hkv) * Dh + H * Dh * D + 3 * D * F + 2 * D
    weights = L * per_layer + D + args.vocab_size * D + batch * D
    kv = 2 * L * batch * Hkv * seq * Dh
    return (weights + kv) * torch.finfo(dtype).bits // 8


def _step_ms(begin, new: int, repeats: int, warm: int) -> float:
    """Median ms per decode step over `repeats` sequences (one more first, dropped: compiles and captures).
    begin() starts a sequence and returns (step, first token), step(token) -> next token; `warm` steps run
    untimed, then new - 2 steps between CUDA events (the wall clock without CUDA)."""
    times = []
    timer = _Timer()
    for _ in range(repeats + 1):
        step, tok = begin()
        for _ in range(warm):
            tok = step(tok)
        timer.start()
        for _ in range(new - 2):
            tok = step(tok)
        times.append(timer.stop() / (new - 2))
    return statistics.median(times[1:])


def _time_ours(model, ids, new: int, repeats: int) -> tuple[float, float]:
    """(prefill ms, decode ms/token) for our model in its current backend/grouping."""
    B, T = ids.shape

    def begin():
        cache = model.new_cache(B, T + new + 2)
        logits = model(ids, cache=cache)[:, -1]
        decode = model.decoder(cache, check_tokens=False)  # its own tokens, as generate's steps
        return (lambda tok: model.argmax(decode(tok))), model.argmax(logits)

    def prefill():
        model(ids, cache=model.new_cache(B, T + new + 2))

    decode_ms = _step_ms(begin, new, repeats, warm=2)  # eager warm-up step and graph capture (Triton backend)
    return _events_ms(prefill, max(repeats, 10)), decode_ms


SLEEP_CYCLES = 400_000_000  # ~0.2 s of GPU sleep at H100 clocks: longer than any step's host launch time
REST_S = 0.3  # host sleep before a rested prompt: enough for an H100 at its power limit to regain its clock


def prefill_split_ms(model, ids: torch.Tensor, repeats: int, cache_len: int | None = None) -> dict[str, float]:
    """Where a Triton-backend prefill's time goes: median over `repeats` of
    * wall_ms: CUDA events around new_cache + forward, as a user runs it (on CUDA the prompt's bucket
      replayed from a CUDA graph, graphs.py; the forward's input check syncs once, so the GPU waits for
      the host's launches), right after the other forms (the GPU busy before it);
    * rested_ms: the same after REST_S of host sleep (the GPU idle before it);
    * eager_ms: wall_ms with the prefill graphs off (every kernel launched from Python);
    * device_ms: the same step (fused.step, which reads no device value on the host) enqueued behind a
      GPU sleep, so the host's launch time is hidden;
    * loaded_device_ms: the same step's device time under load (loaded_device_ms: replayed back to back
      from a CUDA graph; None when that graph does not fit), once, after the rest;
    * host_ms / graph_host_ms: wall time to enqueue the eager / the graph-replayed forward.
    A compute-bound step's device time depends on what ran before it: a GPU at its power limit lowers its
    clock (one H100, LLaMA-7B's 512-token prompt graph: 12.35 ms per replay, 1515 MHz, 694 W, back to back;
    10.99 ms, 1980 MHz, after 0.3 s of rest or behind a 0.2 s GPU sleep; benchmarks/graph_launch.py's
    replay_regimes). So wall_ms compares with loaded_device_ms (both under load); device_ms (behind a GPU
    sleep, which draws no power) is the full clock's. rested_ms is what a prompt arriving at an idle GPU
    waits: a compute-bound one regains the full clock, a small one waits longer (SmolLM2's 512-token prompt:
    2.15 ms rested, 1.82 back to back, 1.47 of device time under load; its graph's replay alone after the same
    rest only 0.08 ms longer than back to back, so most of it is the host's Python after a sleep; H100,
    20c0be7 and 80a81bc)."""
    from . import fused

    B, T = ids.shape
    cache_len = cache_len or T
    backend = model.accelerator
    times: dict[str, list[float]] = {key: [] for key in ("wall_ms", "rested_ms", "eager_ms", "device_ms",
                                                           "host_ms", "graph_host_ms")}
    was = backend.prefill_graphs
    try:
        for graphs in (True, False):
            backend.prefill_graphs = graphs
            for _ in range(2):  # the bucket's first forward runs eagerly, its second captures the graph
                model(ids, cache=model.new_cache(B, cache_len))
        forms = ((True, "rested_ms", None, REST_S), (True, "wall_ms", "graph_host_ms", 0.0),
                 (False, "eager_ms", "host_ms", 0.0))  # prefill graphs, the wall's key, the host's, rest first
        for _ in range(repeats):
            for graphs, wall, host, rest in forms:
                backend.prefill_graphs = graphs
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                if rest:
                    time.sleep(rest)
                t0 = time.perf_counter()
                start.record()
                model(ids, cache=model.new_cache(B, cache_len))
                if host is not None:
                    times[host].append((time.perf_counter() - t0) * 1e3)
                end.record()
                end.synchronize()
                times[wall].append(start.elapsed_time(end))
            cache = model.new_cache(B, cache_len)
            torch.cuda._sleep(SLEEP_CYCLES)
            start.record()
            fused.step(model, ids, None, cache)
            end.record()
            end.synchronize()
            times["device_ms"].append(start.elapsed_time(end))
        cache = model.new_cache(B, cache_len)
        loaded = loaded_device_ms(lambda: fused.step(model, ids, None, cache), repeats, before=cache.clear)
    finally:
        backend.prefill_graphs = was
    return {**{key: statistics.median(values) for key, values in times.items()}, "loaded_device_ms": loaded}


def _warm_up_gpu(device: torch.device, seconds: float = 1.0) -> None:
    """Keep the GPU busy for a while first: a GPU coming out of idle runs short jobs at lower clocks
    (seen on the H100: the first 512-token prefill timed in a process 37 ms, the same one later 18 ms)."""
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    while True:
        for _ in range(20):
            a @ a
        end.record()
        end.synchronize()
        if start.elapsed_time(end) > 1000 * seconds:
            return


def device_ms(run, repeats: int, before=None) -> float:
    """Median device ms of run() over `repeats` calls, each enqueued behind a GPU sleep so that its host
    launch time is hidden (run must not read the device: that would wait out the sleep); before() runs
    ahead of each call, untimed (e.g. a cache's clear)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        torch.cuda._sleep(SLEEP_CYCLES)
        if before is not None:
            before()
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


LOADED_S = 0.5  # back-to-back replays before loaded_device_ms's timed ones: a GPU at its power limit by then


def loaded_device_ms(run, repeats: int, before=None, seconds: float = LOADED_S) -> float | None:
    """Median device ms of run() under load: before() and run() (graph-safe: no host reads of device values)
    captured in one CUDA graph, replayed in batches of `repeats`, each replay between CUDA events, all of a
    batch queued at once (the GPU never waits for the host), a synchronisation between batches, for at least
    `seconds`; the last batch's median. The clock of a GPU running prompts one after another, which for a
    compute-bound step is the lower clock of its power limit (bench.device_ms: the full clock, after a
    sleep). None when the graph's memory does not fit (graphs' capture warns)."""
    from .graphs import _CapturedLazily

    def step():
        if before is not None:
            before()
        run()

    captured = _CapturedLazily()
    for _ in range(2):  # eager on a side stream (compiled and autotuned there), then captured
        captured.replay_or_run(step)
    if captured.graph is None:
        return None
    graph = captured.graph
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    t0 = time.perf_counter()
    while True:
        torch.cuda.synchronize()
        for start, end in events:
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        if time.perf_counter() - t0 >= seconds:
            return statistics.median(start.elapsed_time(end) for start, end in events)


def ttft_ms(first_token, repeats: int) -> float:
    """Median wall-clock ms of first_token() (which ends with the token on the host; or any call that ends
    with its result on the host, e.g. a whole generate) over `repeats` calls after one warm-up call, the
    device idle before each."""
    first_token()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        first_token()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def _time_hf(hf, ids, new: int, repeats: int) -> tuple[float, float]:
    from transformers import DynamicCache

    def begin():
        cache = DynamicCache()

        def step(tok):
            return hf(tok[:, None], past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)

        return step, hf(ids, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)

    decode_ms = _step_ms(begin, new, repeats, warm=0)
    prefill_ms = _events_ms(lambda: hf(ids, past_key_values=DynamicCache(), use_cache=True), max(repeats, 10))
    return prefill_ms, decode_ms


class HFCompiled:
    """Greedy decoding with transformers as its documentation says to for speed: a StaticCache of
    `max_len` positions and the model's forward compiled (torch.compile, `mode`, fullgraph). prefill(ids)
    resets the cache and returns the first greedy token; step(tok) feeds one token per sequence and returns
    the next. backend="eager" traces with dynamo without code generation (the CPU tests)."""

    def __init__(self, hf, batch: int, max_len: int, *, mode: str | None = "reduce-overhead",
                 backend: str = "inductor"):
        from transformers import StaticCache

        try:
            self.cache = StaticCache(config=hf.config, max_cache_len=max_len)
        except TypeError:  # transformers 4.x: the batch, device and dtype up front
            self.cache = StaticCache(config=hf.config, max_batch_size=batch, max_cache_len=max_len,
                                     device=hf.device, dtype=hf.dtype)
        early = getattr(self.cache, "early_initialization", None)
        if early is not None:  # transformers allocates the cache at its first update unless told here: with the
            # prompt compiled too, inside the compiled graph, where it is not marked static (transformers asks for
            # early_initialization then); the likely cause of a segfault in torch's cudagraph trees at the first
            # decode step (torch 2.11, transformers 5.17, H200, 02f60b6)
            cfg = hf.config
            heads = cfg.num_attention_heads
            early(batch, getattr(cfg, "num_key_value_heads", None) or heads,
                  getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, hf.dtype, hf.device)
        self.forward = torch.compile(hf.forward, mode=mode, fullgraph=True, dynamic=False, backend=backend)
        self.device, self.max_len, self.pos = hf.device, max_len, 0

    def _next(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        if self.pos + T > self.max_len:
            raise ValueError(f"the static cache holds {self.max_len} positions; {self.pos} + {T} do not fit")
        position = torch.arange(self.pos, self.pos + T, device=self.device)
        torch.compiler.cudagraph_mark_step_begin()  # the last call's graph outputs are no longer read
        logits = self.forward(ids, past_key_values=self.cache, cache_position=position, use_cache=True).logits
        self.pos += T
        return logits[:, -1].argmax(-1)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        self.cache.reset()
        self.pos = 0
        return self._next(ids)

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        return self._next(tok[:, None])


def _time_hf_compiled(runner: HFCompiled, ids, new: int, repeats: int) -> tuple[float, float]:
    decode_ms = _step_ms(lambda: (runner.step, runner.prefill(ids)), new, repeats, warm=2)
    return _events_ms(lambda: runner.prefill(ids), max(repeats, 10)), decode_ms


def card(device: torch.device) -> str:
    """What a record names as the machine: the GPU's name, or the CPU with the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads ({platform.machine()})"


def write_record(out: str | os.PathLike, *, device: torch.device, commit: str, title: str, what: str,
                 **fields) -> None:
    """Write a benchmark script's record as JSON: title and what it measured, the machine, the date, the
    commit (taken when the script started) and the command line that ran it, then its own fields."""
    out = Path(out)
    record = dict(title=title, what=what, card=card(device), date=datetime.date.today().isoformat(),
                  commit=commit, command="python " + " ".join(sys.argv), source=Path(sys.argv[0]).name, **fields)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


def _commit() -> str:
    if envs.get("CQIL_COMMIT"):
        return envs.get("CQIL_COMMIT")
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@torch.inference_mode()
def run_bench(shape: str = "smollm2-135m", groups: str | None = None, batch: int = 1, prompt: int = 512,
              new: int = 64, dtype: str = "bfloat16", repeats: int = 5,
              variants: tuple[str, ...] = VARIANTS, command: str = "", progress=None) -> dict:
    """Measure the variants; returns the result record (see module docstring). progress(record), if given,
    is called after each variant with the record so far, whose `pending` lists the variants still to run
    (the CLI writes it, so that a run cut short keeps what it measured); the returned record has none."""
    from .demo import parse_groups
    from .llama import CQILLlama

    if not torch.cuda.is_available():
        raise ValueError("cqil bench measures GPU latency and needs a CUDA device")
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"unknown variants {bad}; choose from {VARIANTS}")
    if new < 4 or prompt < 1 or batch < 1 or repeats < 1:
        raise ValueError("need new >= 4, prompt >= 1, batch >= 1, repeats >= 1")
    torch_dtype = getattr(torch, dtype)
    device = torch.device("cuda")
    groups = groups or DEFAULT_GROUPS[shape]
    cqil = parse_groups(groups)
    hf = random_hf_model(shape, torch_dtype, device)
    model = CQILLlama.from_pretrained(hf)
    cqil.validate(model.args.num_hidden_layers)
    ids = torch.randint(0, model.args.vocab_size, (batch, prompt), device=model.device)
    step_bytes = decode_step_bytes(model.args, torch_dtype, batch, prompt + new // 2)
    copy = copy_bandwidth_gbps(device)
    _warm_up_gpu(device)
    import triton
    import transformers

    record = dict(
        card=torch.cuda.get_device_properties(device).name,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        commit=_commit(), command=command, shape=shape, config=SHAPES[shape], groups=groups,
        cqil=cqil.to_dict(), batch=batch, prompt=prompt, new_tokens=new, dtype=dtype, repeats=repeats,
        decode_step_bytes=step_bytes, copy_gbps=round(copy, 1),
        floor_ms_per_token=round(step_bytes / copy / 1e6, 4),
        versions=dict(torch=torch.__version__, triton=triton.__version__,
                      transformers=transformers.__version__, python=platform.python_version()),
        results={}, pending=list(variants))
    for variant in variants:
        record["results"][variant] = _measure_variant(variant, hf, model, cqil, ids, new, repeats, step_bytes, copy)
        record["pending"].remove(variant)
        if progress is not None:
            progress(record)
        # the next variant starts with only what it needs held: transformers' copy of the weights once no hf
        # variant is left, and none of our graphs and kept caches (LLaMA-7B at batch 32 on an 80 GB H100 ran out
        # of memory in triton-cqil's prefill with both and triton-seq's graphs' caches held)
        if not any(v.startswith("hf") for v in record["pending"]):
            hf = None
        if model.accelerator is not None:
            model.accelerator.clear_graphs()
        gc.collect()
        torch.cuda.empty_cache()
    del record["pending"]
    return record


def _measure_variant(variant: str, hf, model, cqil: CQILConfig, ids: torch.Tensor, new: int, repeats: int,
                     step_bytes: int, copy: float) -> dict:
    """One variant of run_bench: its results entry (and its line printed)."""
    whole = None  # a whole generate call: ours only
    if variant == "hf-eager":
        prefill_ms, decode_ms = _time_hf(hf, ids, new, repeats)
        first = ttft_ms(lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1,
                                            do_sample=False, pad_token_id=0)[:, -1].cpu(), max(repeats, 10))
    elif variant == "hf-compiled":
        runner = HFCompiled(hf, ids.shape[0], ids.shape[1] + new + 2)
        prefill_ms, decode_ms = _time_hf_compiled(runner, ids, new, repeats)
        first = ttft_ms(lambda: runner.prefill(ids).cpu(), max(repeats, 10))
        del runner
    else:
        model.backend = "torch" if variant == "torch" else "triton"
        model.cqil = cqil if variant == "triton-cqil" else CQILConfig()
        prefill_ms, decode_ms = _time_ours(model, ids, new, repeats)
        first = ttft_ms(lambda: model.generate(ids, 1)[:, -1].cpu(), max(repeats, 10))
        whole = ttft_ms(lambda: model.generate(ids, new).cpu(), repeats)  # a user's call, end to end
    gbps = step_bytes / decode_ms / 1e6
    result = dict(prefill_ms=round(prefill_ms, 4), ttft_ms=round(first, 4), decode_ms_per_token=round(decode_ms, 4),
                  decode_gbps=round(gbps, 1), decode_pct_of_copy=round(100 * gbps / copy, 1))
    if whole is not None:
        result["generate_ms"] = round(whole, 3)
    split = ""
    if variant.startswith("triton"):  # the prefill without graphs, its device time and host time
        parts = prefill_split_ms(model, ids, repeats, cache_len=ids.shape[1] + new + 2)
        loaded = parts["loaded_device_ms"]
        result.update(prefill_eager_ms=round(parts["eager_ms"], 4), prefill_device_ms=round(parts["device_ms"], 4),
                      prefill_loaded_device_ms=None if loaded is None else round(loaded, 4),
                      prefill_rested_ms=round(parts["rested_ms"], 4), prefill_host_ms=round(parts["host_ms"], 4),
                      prefill_graph_host_ms=round(parts["graph_host_ms"], 4))
        loaded_text = "did not fit" if loaded is None else f"{loaded:.3f}"
        split = (f" (device under load {loaded_text}, rested {parts['rested_ms']:.3f}, eager {parts['eager_ms']:.3f},"
                 f" device {parts['device_ms']:.3f}, host eager {parts['host_ms']:.3f} / graph "
                 f"{parts['graph_host_ms']:.3f})")
    whole_text = f"   generate {new} tokens {whole:.2f} ms" if whole is not None else ""
    print(f"{variant:>12}: prefill {prefill_ms:8.3f} ms{split}   first token {first:8.3f} ms   "
          f"decode {decode_ms:7.4f} ms/token   "
          f"{gbps:7.1f} GB/s ({100 * gbps / copy:.0f}% of copy){whole_text}", flush=True)
    return result


def plot(record: dict, path: str | os.PathLike) -> None:
    """Bar charts of decode ms/token and prefill ms per variant (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(record["results"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in [(axes[0], "decode_ms_per_token", "decode ms/token"),
                           (axes[1], "prefill_ms", f"prefill ms ({record['prompt']} tokens)")]:
        values = [record["results"][n][key] for n in names]
        bars = ax.bar(names, values, color=["#999999", "#b8b8b8", "#6b8ec7", "#3a6fb5", "#d0652f"][:len(names)])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.tick_params(axis="x", labelsize=8)
    axes[0].axhline(record["floor_ms_per_token"], color="k", lw=0.8, ls="--")
    axes[0].text(0, record["floor_ms_per_token"], " bandwidth floor", va="bottom", fontsize=7)
    fig.suptitle(f"{record['shape']} ({record['dtype']}, batch {record['batch']}, groups "
                 f"{record['groups']}) on {record['card']}, commit {record['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(record: dict, out: str | os.PathLike) -> Path:
    """Write record as JSON to `out` (through a temporary file beside it: a reader never sees half of it)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    part.write_text(json.dumps(record, indent=1) + "\n")
    part.replace(out)
    return out


def write(record: dict, out: str | os.PathLike) -> list[Path]:
    """Write record as JSON to `out` and a PNG beside it when matplotlib is installed."""
    out = Path(out)
    written = [write_json(record, out)]
    try:
        plot(record, out.with_suffix(".png"))
        written.append(out.with_suffix(".png"))
    except ImportError:
        print("matplotlib is not installed: no PNG (render later with `cqil bench --plot FILE.json`)")
    return written
