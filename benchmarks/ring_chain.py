"""Prototype for the persistent decode step (issue 26), third stage: does a weight stream that never waits on
activations take away the cost of a layer boundary? The GEMV chain of persistent_chain.py (out_l = W_l @
out_{l-1}, the 7B MLP's shapes alternating), batch 1, in one CUDA C++ launch (ring_chain.cu): per SM a
producer thread copies the block's next tasks' weight rows into a shared-memory ring with bulk copies (TMA)
while consumer warps multiply, so the memory system keeps streaming while the consumers wait at a layer
boundary. Timed against persistent_chain.py's Triton variants on the same weights in the same process:

    python benchmarks/ring_chain.py --layers 2 --layers 8 --out ring_chain.json

Variants: persistent_chain.py's `launch`, `pdl` and `persistent`, and `ring-S` for each --slots S: a ring of
S slots of --ring-kb / S KiB each and S consumer warps (`ring-S:C` for --slots S:C: C consumer warps).
Diagnostics for each --diagnose S or S:C (results unchecked):
`ring-S/stream`, the weights streamed through the ring and no products; `ring-S/compute`, the products of
whatever the ring holds and no weights streamed; each keeps every wait and counter. Every other variant is
checked before it is timed: each layer of the ring chain against the float64 product of its own input
(ring_bound), the Triton variants' result against each other as persistent_chain.py does. Needs an sm_90
GPU (cp.async.bulk, mbarrier) and nvcc; the library is built once per source into ~/.cache/cqil_ring_chain.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import hashlib
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("ring_chain.cu")
MAX_ROWS = 8        # rows of one task (ring_chain.cu's task_rows: 1, 2, 4 or 8)
MAX_CONSUMERS = 8   # consumer warps (kMaxConsumers)
SMEM_LIMIT = 227 * 1024  # dynamic shared memory one block may have on sm_90
RING_KB = 172       # 4 slots of 43 KiB: the 7B MLP's tasks (4 rows of 4096, 2 of 11008) beside two x buffers


def rows_per_task(N: int, K: int, slot_bytes: int, elem: int = 2) -> int:
    """Rows of one task of a [N, K] weight: the largest power of two up to MAX_ROWS that divides N and whose
    rows fit one slot."""
    if K * elem > slot_bytes:
        raise ValueError(f"one row of K={K} ({K * elem} bytes) does not fit a slot of {slot_bytes} bytes")
    rows = 1
    while rows * 2 <= MAX_ROWS and N % (rows * 2) == 0 and rows * 2 * K * elem <= slot_bytes:
        rows *= 2
    return rows


def plan(shapes: list[tuple[int, int]], slot_bytes: int) -> list[tuple[int, int, int, int]]:
    """The chain's tasks in launch order, (layer, first row, rows, K): layers in order, then rows."""
    tasks = []
    for layer, (N, K) in enumerate(shapes):
        rows = rows_per_task(N, K, slot_bytes)
        tasks += [(layer, row0, rows, K) for row0 in range(0, N, rows)]
    return tasks


def smem_bytes(slots: int, slot_bytes: int, x_bytes: int) -> int:
    """Dynamic shared memory of one block (ring_chain_launch's sum): ring, its barriers, two x buffers and tags."""
    return slots * slot_bytes + 2 * x_bytes + 2 * slots * 8 + 16


def first_of_layer(tasks: list[tuple[int, int, int, int]], grid: int) -> list[bool]:
    """Whether each task is its block's first of its layer (block g % grid runs tasks g, g + grid, ...)."""
    return [g < grid or tasks[g - grid][0] != t[0] for g, t in enumerate(tasks)]


def _nvcc() -> str:
    from torch.utils.cpp_extension import CUDA_HOME

    for cand in ([str(Path(CUDA_HOME) / "bin" / "nvcc")] if CUDA_HOME else []) + [shutil.which("nvcc") or ""]:
        if cand and Path(cand).exists():
            return cand
    raise RuntimeError("ring_chain needs nvcc (CUDA_HOME/bin or PATH) to build ring_chain.cu")


def available() -> bool:
    """Whether build() can run here: an sm_90 GPU and the nvcc _nvcc() finds (the CUDA tests' condition)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        return False
    try:
        _nvcc()
    except RuntimeError:
        return False
    return True


@functools.cache
def build(source: Path, defines: tuple[str, ...] = ()) -> ctypes.CDLL:
    """A prototype's .cu built for this GPU (sm_90a) and loaded, cached per source, `defines` (NAME=VALUE,
    nvcc's -D), the headers it may include (beside it and beside this file, which is on the include path, so
    that an older copy of a .cu elsewhere builds too) and nvcc, in ~/.cache/cqil_ring_chain."""
    major, minor = torch.cuda.get_device_capability()
    if major != 9:
        raise RuntimeError(f"{source.name} needs an sm_90 GPU (bulk copies, mbarriers); this one is sm_{major}{minor}")
    nvcc = _nvcc()
    here = Path(__file__).resolve().parent
    headers = sorted(set(source.resolve().parent.glob("*.cuh")) | set(here.glob("*.cuh")))
    src = source.read_bytes() + b"".join(h.read_bytes() for h in headers) + "\0".join(defines).encode()
    key = hashlib.sha256(src + nvcc.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cqil_ring_chain"
    cache.mkdir(parents=True, exist_ok=True)
    lib = cache / f"{source.stem}_{key}.so"
    if not lib.exists():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            out = Path(tmp) / lib.name
            cmd = [nvcc, "-O3", "-lineinfo", "-std=c++17", "-arch=sm_90a", "-shared", "-Xcompiler", "-fPIC",
                   "-I", str(here), *(f"-D{d}" for d in defines), "-o", str(out), str(source)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"building {source.name} failed:\n{' '.join(cmd)}\n{done.stderr}")
            os.replace(out, lib)  # atomic: parallel builds of one source leave one whole file
    return ctypes.CDLL(str(lib))


@functools.cache
def library() -> ctypes.CDLL:
    """ring_chain.cu built (build) with its entry points' signatures."""
    so = build(SOURCE)
    so.ring_chain_launch.restype = ctypes.c_int
    so.ring_chain_launch.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int] * 7 + [
        ctypes.c_void_p, ctypes.c_void_p]
    so.ring_chain_error.restype = ctypes.c_char_p
    so.ring_chain_error.argtypes = [ctypes.c_int]
    return so


def resident_grid(device: torch.device, grid: int | None) -> int:
    """The blocks of a ring launch: `grid`, default one per SM. Its blocks wait on one another, so every block
    must be resident at once: at most one per SM (a CPU device counts as one SM, for the tests of the checks)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    if not 1 <= (grid or sms) <= sms:
        raise ValueError(f"grid must be 1..{sms} (one block per SM), got {grid}")
    return grid or sms


class RingChain:
    """out_l = W_l @ act_l into act_{l+1} for l = 0..L-1 in one launch. weights[l]: [N_l, K_l] bf16, K_l =
    N_{l-1}; acts[l]: [K_l] (acts[0] the input), acts[L]: [N_{L-1}]; all contiguous on one CUDA device and
    16-byte aligned. The tensors are borrowed: run() reads and writes them in place. mode: "chain";
    the diagnostics (results meaningless, every wait kept) "stream", the weights streamed and no products,
    "compute", the products of whatever the ring holds and no weights streamed. grid: blocks (default and
    at most one per SM). profile: every run stamps each task (STAMPS, profile_summary)."""

    MODES = {"chain": 0, "stream": 1, "compute": 2}
    STAMPS = ("issued", "taken", "x", "data", "stored")  # ring_chain.cu's kStamps, in its order

    def __init__(self, weights: list[torch.Tensor], acts: list[torch.Tensor], slots: int = 4,
                 ring_kb: int = RING_KB, consumers: int | None = None, mode: str = "chain",
                 grid: int | None = None, profile: bool = False):
        if len(acts) != len(weights) + 1 or not weights:
            raise ValueError(f"{len(weights)} weights need {len(weights) + 1} activations, got {len(acts)}")
        device = weights[0].device
        for i, t in enumerate(list(weights) + list(acts)):
            name = f"weights[{i}]" if i < len(weights) else f"acts[{i - len(weights)}]"
            if t.dtype != torch.bfloat16 or t.device != device or not t.is_contiguous() or t.data_ptr() % 16:
                raise ValueError(f"{name}: bf16, contiguous, 16-byte aligned on {device} expected, got {t.dtype} "
                                 f"on {t.device}, contiguous={t.is_contiguous()}, address % 16 = {t.data_ptr() % 16}")
        shapes = []
        for layer, w in enumerate(weights):
            if w.dim() != 2:
                raise ValueError(f"weights[{layer}] must be [N, K], got {tuple(w.shape)}")
            N, K = w.shape
            if K % 8:
                raise ValueError(f"weights[{layer}]: K={K} must be a multiple of 8 (16-byte chunks)")
            if acts[layer].numel() != K or acts[layer + 1].numel() != N:
                raise ValueError(f"layer {layer} is [{N}, {K}]: its input has {acts[layer].numel()} elements and "
                                 f"its output {acts[layer + 1].numel()}")
            shapes.append((N, K))
        self.consumers = consumers or min(slots, MAX_CONSUMERS)
        if not 1 <= self.consumers <= MAX_CONSUMERS or slots % self.consumers:
            raise ValueError(f"consumers must be 1..{MAX_CONSUMERS} and divide slots={slots}, got {self.consumers}")
        target = (ring_kb * 1024 // slots) // 16 * 16
        tasks = plan(shapes, target)
        per_layer = {layer: rows for layer, _, rows, _ in tasks}
        self.slot_bytes = max(rows * K * 2 for _, _, rows, K in tasks)
        self.x_bytes = max(K for _, K in shapes) * 2
        self.slots = slots
        if smem_bytes(slots, self.slot_bytes, self.x_bytes) > SMEM_LIMIT:
            raise ValueError(f"{slots} slots of {self.slot_bytes} bytes and x buffers of {self.x_bytes} need "
                             f"{smem_bytes(slots, self.slot_bytes, self.x_bytes)} bytes of shared memory, over "
                             f"{SMEM_LIMIT}")
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {sorted(self.MODES)}, got {mode!r}")
        self.mode = self.MODES[mode]
        self.grid = resident_grid(device, grid)
        counts = [shapes[layer][0] // per_layer[layer] for layer in range(len(shapes))]
        firsts = first_of_layer(tasks, self.grid)
        table = torch.zeros(len(tasks), 6, dtype=torch.int64)
        for i, (layer, row0, rows, K) in enumerate(tasks):
            w = weights[layer]
            table[i, 0] = w.data_ptr() + row0 * K * 2
            table[i, 1] = acts[layer].data_ptr()
            table[i, 2] = acts[layer + 1].data_ptr() + row0 * 2
            table[i, 3] = K | (rows << 32)
            table[i, 4] = layer | ((counts[layer - 1] if layer else 0) << 32)
            table[i, 5] = int(firsts[i])
        self.weights, self.acts, self.rows = list(weights), list(acts), per_layer
        self.tasks = table.to(device)
        self.task_layers = torch.tensor([layer for layer, *_ in tasks])
        # per task, globaltimer ns of each of STAMPS (profile_summary); written by every run
        self.prof = torch.zeros(len(tasks), len(self.STAMPS), dtype=torch.int64, device=device) if profile else None
        self.counters = torch.zeros(len(weights), dtype=torch.int32, device=device)

    def run(self) -> None:
        """Queue the chain on the current stream (capturable in a CUDA graph)."""
        lib = library()
        err = lib.ring_chain_launch(self.tasks.data_ptr(), self.tasks.shape[0], self.counters.data_ptr(),
                                    len(self.weights), self.slot_bytes, self.slots, self.consumers, self.x_bytes,
                                    self.grid, self.mode, None if self.prof is None else self.prof.data_ptr(),
                                    torch.cuda.current_stream().cuda_stream)
        if err:
            raise RuntimeError(f"ring_chain_launch: {lib.ring_chain_error(err).decode()}")


def profile_summary(chain) -> list[dict]:
    """Where a profiled chain's last run spent its time, per layer, in µs. Medians over the layer's tasks
    (the mean of the middle two for an even count): a task's consumer waiting for x ("wait x": the layer
    boundary), then for its slot's bytes ("wait data": the stream), then multiplying and storing
    ("compute"); a slot's time from its copy's issue to its consumer having it ("in flight", ring time
    included). The layer's span from its first copy issued to its last rows stored, and "boundary": from
    the last rows of the layer before stored to the first task of this one holding x. chain: a RingChain, or
    any object with its weights, prof ([n, STAMPS]) and task_layers ([n]); rows are slots' worth of work
    (ring_batch's pages: "wait x" then over the rows of its `waits_x` mask, a task's first page)."""
    p = chain.prof.cpu().double()
    if not (p > 0).all():
        raise ValueError("the profile has tasks without stamps: run the chain first")
    p = (p - p.min()) / 1e3
    issued, taken, x, data, stored = p.unbind(1)
    rows, last_stored = [], None
    for layer in range(len(chain.weights)):
        sel = chain.task_layers == layer

        def median(t: torch.Tensor, rows: torch.Tensor = sel) -> float:
            return t[rows].quantile(0.5).item()

        waits = sel & getattr(chain, "waits_x", torch.ones_like(sel))
        row = {"layer": layer, "tasks": int(sel.sum()), "wait x": median(x - taken, waits),
               "wait data": median(data - x),
               "compute": median(stored - data), "in flight": median(data - issued),
               "first issued": issued[sel].min().item(), "last stored": stored[sel].max().item()}
        row["boundary"] = None if last_stored is None else x[sel].min().item() - last_stored
        last_stored = row["last stored"]
        rows.append({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    return rows


def ring_bound(w: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 product bf16(W @ x) of a layer's own input x ([K], or [batch, K] for one product per row)
    and how far the kernel may be from it: an fp32 sum of K products is within K * 2^-24 * sum |w x| of the
    exact one (the bound allows twice that), and rounding that to bf16 instead of the exact sum moves it by at
    most one bf16 unit in the last place (2^-7 of its size)."""
    w64, x64 = w.double(), x.double()
    exact = x64 @ w64.t()
    fp32_err = w.shape[1] * 2.0 ** -24 * (x64.abs() @ w64.abs().t())
    return exact.to(torch.bfloat16).double(), 2.0 ** -7 * exact.abs() + 2 * fp32_err


def check_layers(chain: RingChain) -> float:
    """Largest |kernel - float64| / bound over every layer's outputs, each from the kernel's own input;
    raises where one is over its bound."""
    worst = 0.0
    for layer, w in enumerate(chain.weights):
        ref, bound = ring_bound(w, chain.acts[layer])
        err = (chain.acts[layer + 1].double() - ref).abs()
        ratio = (err / bound.clamp_min(1e-300)).max().item()
        if ratio > 1:
            raise AssertionError(f"layer {layer}: error {err.max().item():.3e} over its bound (ratio {ratio:.2f})")
        worst = max(worst, ratio)
    return worst


def ring_spec(spec: str) -> dict:
    """--slots S or S:C as RingChain's slots and consumers."""
    slots, _, consumers = spec.partition(":")
    return dict(slots=int(slots), consumers=int(consumers) if consumers else None)


def main(argv=None) -> None:
    from cqil_kernels.bench import _commit, _warm_up_gpu, copy_bandwidth_gbps, write_record
    from persistent_chain import Chain, replay_ms

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs=2, default=[4096, 11008], metavar=("D", "F"))
    ap.add_argument("--layers", type=int, action="append", help="chain lengths (default 2 and 8)")
    ap.add_argument("--slots", action="append",
                    help="S or S:C, ring slots (and consumer warps, default S), one variant each "
                         "(default 4, 8, 4:2, 8:4, 8:2)")
    ap.add_argument("--diagnose", action="append", help="the rings (S or S:C) diagnosed (default 8:4)")
    ap.add_argument("--profile", action="append", help="rings (S or S:C) run once more with per-task stamps "
                                                       "(profile_summary) after the timing (default 8:4)")
    ap.add_argument("--ring-kb", type=int, default=RING_KB)
    ap.add_argument("--block-k", type=int, default=256,
                    help="the Triton variants' BLOCK_K (persistent_chain.py's default 256; both dims must be "
                         "multiples of it: 64 for a tensor-parallel shard's 2752)")
    ap.add_argument("--replays", type=int, default=20, help="chains per graph replay")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("ring_chain measures GPU time and needs a CUDA device")
    device, commit = torch.device("cuda"), _commit()
    _warm_up_gpu(device, 1.0)
    copy = copy_bandwidth_gbps(device)
    rows, times_all, layout, profiles = [], {}, {}, {}
    for layers in a.layers or [2, 8]:
        chain = Chain(tuple(a.dims), layers, 1, torch.bfloat16, device, block_k=a.block_k)
        runs = {v: functools.partial(chain.run, v) for v in ("launch", "pdl", "persistent")}
        rings = {}
        acts = [chain.act[0, 0, :a.dims[0]]]  # batch row 0 of each layer's activation buffer
        acts += [chain.act[lay + 1, 0, :chain.layer_shape(lay)[0]] for lay in range(layers)]
        weights = [chain.weight(lay) for lay in range(layers)]
        for spec in a.slots or ["4", "8", "4:2", "8:4", "8:2"]:
            ring = RingChain(weights, acts, ring_kb=a.ring_kb, **ring_spec(spec))
            rings[f"ring-{spec}"] = ring
            runs[f"ring-{spec}"] = ring.run
            layout[f"ring-{spec}"] = dict(slot_bytes=ring.slot_bytes, consumers=ring.consumers,
                                          rows_per_task=[ring.rows[lay] for lay in range(min(layers, 2))])
        diagnostics = {}
        for spec in a.diagnose or ["8:4"]:
            for mode in ("stream", "compute"):
                diagnostics[f"ring-{spec}/{mode}"] = RingChain(weights, acts, ring_kb=a.ring_kb, mode=mode,
                                                               **ring_spec(spec)).run
        runs.update(diagnostics)
        outs, worst = {}, {}
        for v, run in runs.items():  # compile or build, check, then capture
            chain.act[1:].zero_()
            run()
            torch.cuda.synchronize()
            outs[v] = chain.output().clone()
            if v in rings:
                worst[v] = check_layers(rings[v])
            elif v in diagnostics:
                continue
            elif not torch.equal(outs[v], outs["launch"]):
                raise SystemExit(f"{v} differs from launch at {layers} layers")
        graphs = {}
        for v, run in runs.items():
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(a.replays):
                    run()
            graphs[v] = g
        times = {v: [1000 * ms / a.replays for ms in t] for v, t in replay_ms(graphs, a.rounds).items()}
        floor_us = chain.weight_bytes() / copy / 1e3
        for v in runs:
            us = statistics.median(times[v])
            rows.append([v, layers, round(us, 2), round(us / layers, 2), round(100 * floor_us / us, 1),
                         round((us - floor_us) / layers, 2), round(worst[v], 3) if v in worst else None])
            print(f"{layers:>3} layers {v:>11}: {us:9.2f} us, {us / layers:7.2f} us/layer, "
                  f"{100 * floor_us / us:5.1f}% of copy, {(us - floor_us) / layers:6.2f} us/layer over it",
                  flush=True)
        times_all[str(layers)] = times
        for spec in a.profile or ["8:4"]:
            ring = RingChain(weights, acts, ring_kb=a.ring_kb, profile=True, **ring_spec(spec))
            ring.run()
            torch.cuda.synchronize()
            check_layers(ring)
            profiles[f"{layers} layers, ring-{spec}"] = summary = profile_summary(ring)
            for row in summary:
                print(f"{layers:>3} layers ring-{spec} profile: {row}", flush=True)
    write_record(
        a.out, device=device, commit=commit,
        title="Ring chain prototype: a weight stream that never waits on activations, against a launch per layer",
        what=(f"chain of GEMVs alternating {a.dims[0]} -> {a.dims[1]} -> {a.dims[0]}, bf16, batch 1; ring-S: one "
              f"CUDA C++ launch (benchmarks/ring_chain.cu), per SM a TMA producer filling S slots of a "
              f"{a.ring_kb} KiB shared-memory ring, S consumer warps (ring-S:C: C); launch/pdl/persistent: "
              f"persistent_chain.py's Triton variants on the same weights, BLOCK_K {a.block_k}; {a.replays} chains "
              f"per CUDA graph replay, events, medians of {a.rounds} rounds alternated"),
        copy_gbps=round(copy, 1), layout=layout, profiles=profiles,
        columns=["variant", "layers", "us per chain", "us per layer", "% of copy", "us per layer over copy",
                 "worst error / bound"],
        rows=rows, times_us=times_all)


if __name__ == "__main__":
    main()
