"""Prototype for the persistent decode step (issue 26), fourth stage: does ring_chain.py's weight ring hold its
gain at batch 8 to 32? The same GEMV chain (out_l = W_l @ act_l, the 7B MLP's shapes alternating) for batch
rows 1..32 in one CUDA C++ launch (ring_batch.cu), the products on the tensor cores (mma.sync m16n8k16) from
weights packed in the mma's fragment order (pack). A task is 16, 32 or 64 rows of a layer over all of K, run by
the whole block: its pages of whole k-tiles go through the ring and every consumer warp takes its class of
k-tiles (kt % 4) of each. Timed against persistent_chain.py's launch-per-layer Triton variants (batch up to
16) on the same weights in the same process:

    python benchmarks/ring_batch.py --batch 1 --batch 8 --batch 16 --batch 32 --out ring_batch.json

Variants: `launch` and `pdl` (persistent_chain.py, batch <= 16) and `mma-S:C/R` for each --slots S:C and
--rows R: a ring of S slots of --ring-kb / S KiB, C consumer warps, tasks of R rows. Diagnostics for each
--diagnose S:C/R (results unchecked): `/stream`, the pages streamed and no products; `/compute`, the products
of whatever the ring holds and no pages streamed; `/compute-no-x`, the same with no read of x (B fragments of
zeros, or where x is staged, no copies: the x buffers' stale contents); `/compute-no-wait`, the same with no
task waiting for the layer before. Every ring's layers are checked against float64 from their own input
(ring_chain.ring_bound) before timing. Needs an sm_90 GPU and nvcc (built into ~/.cache/cqil_ring_chain as
ring_chain.py is).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import os
import statistics
from pathlib import Path

import torch

from ring_chain import SMEM_LIMIT, RingChain, build, check_layers, profile_summary, resident_grid, ring_spec

SOURCE = Path(__file__).with_name("ring_batch.cu")
TILE = 16            # an mma k-tile and an m-tile's rows
TILE_BYTES = 512     # one packed 16 x 16 k-tile of one m-tile (ring_batch.cu's kTileBytes)
MAX_BATCH = 32       # four n-tiles of 8 batch rows
CONSUMERS = (1, 2, 4)  # consumer warps a block may have: each owns 4 / C of the k-tile classes kt % 4
CUDA_ERROR_TOO_LARGE = 720  # cudaErrorCooperativeLaunchTooLarge: the launcher's residency check refused the grid
RING_KB = 192        # the ring takes most of shared memory (less where the sums and x buffers need more)
STAGED_BATCH = 9     # batches of 9 rows or more stage x through shared memory (ring_batch.cu's staged_x)


def pack(w: torch.Tensor, m_tiles: int = 1) -> torch.Tensor:
    """W [N, K] in the mma's A-fragment order, tasks of `m_tiles` m-tiles: [N / (16 MT), K / 16, MT, 32 lanes,
    8], lane 4g + t of k-tile kt and m-tile mt holding W[g][4t, 4t+1], W[g+8][4t, 4t+1], W[g][4t+2, 4t+3],
    W[g+8][4t+2, 4t+3] (rows of the m-tile, k within kt): a task's k-tiles each one contiguous run."""
    N, K = w.shape
    if N % (TILE * m_tiles) or K % TILE:
        raise ValueError(f"a packed weight needs N a multiple of {TILE * m_tiles} and K of {TILE}, got [{N}, {K}]")
    # [task, mt, h, g, kt, t, q, e]: row 16 (MT task + mt) + 8h + g, k 16kt + 4t + 2q + e; a register is (q, h)
    v = w.reshape(N // (TILE * m_tiles), m_tiles, 2, 8, K // TILE, 4, 2, 2)
    return v.permute(0, 4, 1, 3, 5, 6, 2, 7).reshape(N // (TILE * m_tiles), K // TILE, m_tiles, 32, 8).contiguous()


def fragment_product(packed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The kernel's data path in float64 from the PTX fragment layouts of mma.m16n8k16 (written out here, not
    pack's inverse): lane (g, t)'s registers a0..a3 are A[g][2t:2t+2], A[g+8][2t:2t+2], A[g][2t+8:2t+10],
    A[g+8][2t+8:2t+10] and its b0, b1 are B[2t:2t+2][g], B[2t+8:2t+10][g]; the kernel loads b0, b1 from
    x[n][16kt + 4t : 16kt + 4t + 4]. Returns out [batch, N] = sum over k-tiles of A @ B, row 16 (MT task + mt)
    + r of out being m-tile mt's row r. With pack, this equals x @ W^T."""
    M, KT, MT = packed.shape[:3]
    batch = x.shape[0]
    a = packed.double().permute(0, 2, 1, 3, 4).reshape(M * MT, KT, 8, 4, 4, 2)  # [m, kt, g, t, register, e]
    A = torch.zeros(M * MT, KT, 16, 16, dtype=torch.float64)
    for t in range(4):
        for e in range(2):
            A[:, :, 0:8, 2 * t + e] = a[:, :, :, t, 0, e]
            A[:, :, 8:16, 2 * t + e] = a[:, :, :, t, 1, e]
            A[:, :, 0:8, 2 * t + 8 + e] = a[:, :, :, t, 2, e]
            A[:, :, 8:16, 2 * t + 8 + e] = a[:, :, :, t, 3, e]
    xs = torch.zeros(-(-batch // 8) * 8, KT * TILE, dtype=torch.float64)
    xs[:batch] = x.double()
    xv = xs.reshape(-1, KT, 4, 2, 2)  # [n, kt, t, q, e]: k = 16kt + 4t + 2q + e
    B = torch.zeros(KT, 16, xs.shape[0], dtype=torch.float64)  # [kt, k within the tile, n]
    for t in range(4):
        for e in range(2):
            B[:, 2 * t + e, :] = xv[:, :, t, 0, e].t()
            B[:, 2 * t + 8 + e, :] = xv[:, :, t, 1, e].t()
    D = torch.einsum("mkij,kjn->min", A, B)  # [m, row, n]
    return D.reshape(M * MT * 16, -1)[:, :batch].t()


def class_sums(packed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The kernel's arithmetic in fp32 (an mma's sums are fp32; within one instruction the order is the
    hardware's): for each k-tile class c = kt % 4, the fp32 sum over that class's k-tiles in order of their
    products, then out = bf16((s0 + s2) + (s1 + s3)). Returns [batch, N] bf16; the kernel's bits equal these
    where one k-tile's product rounds alike in both, so the tests compare within ring_bound, not bits."""
    w = unpack(packed).float()
    xf = x.float()
    sums = torch.zeros(4, x.shape[0], w.shape[0])
    for kt in range(packed.shape[1]):
        sums[kt % 4] += xf[:, 16 * kt:16 * kt + 16] @ w[:, 16 * kt:16 * kt + 16].t()
    return ((sums[0] + sums[2]) + (sums[1] + sums[3])).to(torch.bfloat16)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """pack's inverse: W [N, K]."""
    M, KT, MT = packed.shape[:3]
    v = packed.reshape(M, KT, MT, 8, 4, 2, 2, 2)  # [task, kt, mt, g, t, q, h, e]
    return v.permute(0, 2, 6, 3, 1, 4, 5, 7).reshape(M * MT * TILE, KT * TILE)


def pages_of(k_tiles: int, tiles_per_page: int) -> list[tuple[int, int]]:
    """A task's pages over K: (first k-tile, k-tiles)."""
    return [(k0, min(tiles_per_page, k_tiles - k0)) for k0 in range(0, k_tiles, tiles_per_page)]


def plan(shapes: list[tuple[int, int]], m_tiles: int, grid: int) -> list[list[tuple[int, int]]]:
    """Per block, its tasks in chain order: block b runs the chain's tasks b, b + grid, ... (a task is (layer,
    t): rows 16 MT t .. 16 MT (t + 1) of the layer, over all of K)."""
    tasks = [(layer, t) for layer, (N, _) in enumerate(shapes) for t in range(N // (TILE * m_tiles))]
    return [tasks[b::grid] for b in range(grid)]


def patience_ns() -> int:
    """The watchdog's patience built into the kernel: 2 s, or CQIL_RING_PATIENCE_S (seconds; e.g. 60 under
    compute-sanitizer, which runs the kernel many times slower)."""
    raw = os.environ.get("CQIL_RING_PATIENCE_S", "2")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds <= 3600:
        raise ValueError(f"CQIL_RING_PATIENCE_S must be seconds in (0, 3600], got {raw!r}")
    return round(seconds * 1e9)


@functools.cache
def library(source: Path, patience: int) -> ctypes.CDLL:
    """A ring_batch.cu (this one, or an older copy for an A/B: main's --baseline) built with the watchdog's
    patience in ns, its entry points' signatures set."""
    so = build(source, (f"RING_PATIENCE_NS={patience}LL",))
    so.ring_batch_launch.restype = ctypes.c_int
    so.ring_batch_launch.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 8 + [ctypes.c_void_p]
    so.ring_batch_error.restype = ctypes.c_char_p
    so.ring_batch_error.argtypes = [ctypes.c_int]
    return so


def smem_bytes(slots: int, slot_bytes: int, batch: int, m_tiles: int, x_buffers: bool = True) -> int:
    """The shared memory of a launch (ring_batch.cu's ring_batch_smem): the ring, two buffers of the class sums
    ([4 classes, MT, n-tiles, 4, 32] fp32), from batch STAGED_BATCH on two x buffers of a page's k-tiles and the
    n-tiles' rows (32 bytes each) where the kernel has them (x_buffers: False for an older --baseline without),
    the slots' two barriers and the consumers' barrier."""
    nt = -(-batch // 8)
    x = 2 * slot_bytes // (TILE_BYTES * m_tiles) * 8 * nt * 32 if x_buffers and batch >= STAGED_BATCH else 0
    return slots * slot_bytes + 2 * 4 * m_tiles * nt * 4 * 32 * 4 + x + 16 * slots + 16


class RingBatch:
    """out_l = act_l @ W_l^T into act_{l+1} for l = 0..L-1 in one launch, for every batch row. weights[l]:
    [N_l, K_l] bf16 with N a multiple of 16 * m_tiles and K of 16, K_l = N_{l-1}; acts[l]: [batch, K_l]
    (acts[0] the input) with unit column stride and a row stride that is a multiple of 4, 8-byte aligned (of 8,
    16-byte aligned, where x is staged); all on one CUDA device. The weights are packed once (pack; or
    `packed`, their packs for m_tiles); the activations are borrowed, read and written in place by run(). A
    task is m_tiles m-tiles (16 m_tiles rows) of a layer (1, 2 or 4; 4 needs 2 or 4 consumers), run by the
    whole block. slots, ring_kb: the ring (a slot holds whole 4-k-tile groups of a task; default RING_KB KiB,
    or what shared memory has beside the sums and x buffers); consumers: warps (1, 2 or 4) splitting each
    page's k-tiles by class. mode: "chain", or the diagnostics "stream", "compute", "compute-no-x" and
    "compute-no-wait" (main's --diagnose); grid: blocks (default and at most one per SM). profile: every run
    stamps each page (ring_chain.STAMPS, per page of the blocks' lists in order; ring_chain.profile_summary).
    x_buffers: whether `source`'s kernel stages x through shared memory from batch STAGED_BATCH on (this one
    does; False for an older --baseline that does not), which sizes the ring."""

    MODES = {"chain": 0, "stream": 1, "compute": 2, "compute-no-x": 3, "compute-no-wait": 4}

    def __init__(self, weights: list[torch.Tensor], acts: list[torch.Tensor], slots: int = 8,
                 ring_kb: int | None = None, consumers: int | None = 4, mode: str = "chain", grid: int | None = None,
                 packed: list[torch.Tensor] | None = None, profile: bool = False, m_tiles: int = 1,
                 source: Path = SOURCE, x_buffers: bool = True):
        if len(acts) != len(weights) + 1 or not weights:
            raise ValueError(f"{len(weights)} weights need {len(weights) + 1} activations, got {len(acts)}")
        device = weights[0].device
        batch = acts[0].shape[0] if acts[0].dim() == 2 else 0
        if not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"acts must be [batch, K] with batch 1..{MAX_BATCH}, got {tuple(acts[0].shape)}")
        if m_tiles not in (1, 2, 4):
            raise ValueError(f"m_tiles must be 1, 2 or 4 (16, 32 or 64 rows a task), got {m_tiles}")
        rows = TILE * m_tiles
        shapes = []
        for layer, w in enumerate(weights):
            if w.dim() != 2 or w.shape[0] % rows or w.shape[1] % TILE:
                raise ValueError(f"weights[{layer}] must be [N, K] with N a multiple of {rows} and K of {TILE}, "
                                 f"got {tuple(w.shape)}")
            shapes.append(tuple(w.shape))
        for layer in range(1, len(shapes)):
            if shapes[layer][1] != shapes[layer - 1][0]:
                raise ValueError(f"weights[{layer}] takes K={shapes[layer][1]}, but layer {layer - 1} makes "
                                 f"{shapes[layer - 1][0]}")
        for i, t in enumerate(list(weights) + list(acts)):
            name = f"weights[{i}]" if i < len(weights) else f"acts[{i - len(weights)}]"
            if t.dtype != torch.bfloat16 or t.device != device:
                raise ValueError(f"{name}: bf16 on {device} expected, got {t.dtype} on {t.device}")
        for layer, t in enumerate(acts):
            want = shapes[layer][1] if layer < len(shapes) else shapes[-1][0]
            if t.dim() != 2 or tuple(t.shape) != (batch, want):
                raise ValueError(f"acts[{layer}] must be [{batch}, {want}], got {tuple(t.shape)}")
            # B fragments of 8 bytes; staged x (batch >= STAGED_BATCH) is copied 16 bytes at a time
            align = 16 if x_buffers and batch >= STAGED_BATCH else 8
            if t.stride(1) != 1 or t.stride(0) % (align // 2) or t.data_ptr() % align:
                raise ValueError(f"acts[{layer}]: unit column stride, a row stride that is a multiple of {align // 2} "
                                 f"and a {align}-byte aligned start expected at batch {batch} (strides {t.stride()}, "
                                 f"address % {align} = {t.data_ptr() % align})")
        consumers = consumers or 4
        if consumers not in CONSUMERS:
            raise ValueError(f"consumers must be one of {CONSUMERS} (each takes 4 / C of the k-tile classes), "
                             f"got {consumers}")
        if m_tiles == 4 and consumers == 1:
            raise ValueError("tasks of 4 m-tiles need 2 or 4 consumers (one warp's 4 class sums of 4 m-tiles would "
                             "not fit its registers)")
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        group = 4 * TILE_BYTES * m_tiles  # a slot holds whole groups of 4 k-tiles (a page starts on class 0)
        if ring_kb is None:  # RING_KB, or the most whole groups shared memory has beside the sums and x buffers
            groups = RING_KB * 1024 // slots // group
            while groups > 1 and smem_bytes(slots, groups * group, batch, m_tiles, x_buffers) > SMEM_LIMIT:
                groups -= 1
            ring_kb = slots * groups * group // 1024
        tiles_per_page = ring_kb * 1024 // slots // group * 4
        if tiles_per_page < 4:
            raise ValueError(f"{slots} slots of {ring_kb} KiB hold no 4 k-tiles of {rows} rows "
                             f"({4 * TILE_BYTES * m_tiles} bytes) each")
        self.slot_bytes, self.slots, self.consumers = tiles_per_page * TILE_BYTES * m_tiles, slots, consumers
        need = smem_bytes(slots, self.slot_bytes, batch, m_tiles, x_buffers)
        if need > SMEM_LIMIT:
            raise ValueError(f"{slots} slots of {self.slot_bytes} bytes, the sums and x buffers need {need} bytes of "
                             f"shared memory, more than {SMEM_LIMIT}")
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {sorted(self.MODES)}, got {mode!r}")
        self.mode = self.MODES[mode]
        self.grid = resident_grid(device, grid)
        if packed is not None and any(tuple(p.shape[:3]) != (N // rows, K // TILE, m_tiles)
                                      for p, (N, K) in zip(packed, shapes)):
            raise ValueError(f"packed weights must be pack(w, {m_tiles}) of each weight")
        self.packed = packed if packed is not None else [pack(w, m_tiles) for w in weights]
        blocks = plan(shapes, m_tiles, self.grid)
        task_rows, task_off, page_off, layers_of, firsts = [], [0], [0], [], []
        for tasks in blocks:
            pages = 0
            for layer, t in tasks:
                N, K = shapes[layer]
                x, out = acts[layer], acts[layer + 1]
                wait = shapes[layer - 1][0] // rows if layer else 0
                n_pages = len(pages_of(K // TILE, tiles_per_page))
                task_rows.append((self.packed[layer][t].data_ptr(), x.data_ptr(), out.data_ptr() + t * rows * 2,
                                  layer | wait << 32, K // TILE | x.stride(0) << 32, out.stride(0) | n_pages << 32))
                layers_of += [layer] * n_pages
                firsts += [True] + [False] * (n_pages - 1)
                pages += n_pages
            task_off.append(len(task_rows))
            page_off.append(page_off[-1] + pages)
        self.tasks = torch.tensor(task_rows, dtype=torch.int64).to(device)
        self.task_off = torch.tensor(task_off, dtype=torch.int32).to(device)
        self.page_off = torch.tensor(page_off, dtype=torch.int32).to(device)
        self.counters = torch.zeros(len(weights), dtype=torch.int32, device=device)
        self.task_layers, self.waits_x = torch.tensor(layers_of), torch.tensor(firsts)  # per page (profile_summary)
        self.prof = (torch.zeros(page_off[-1], len(RingChain.STAMPS), dtype=torch.int64, device=device) if profile
                     else None)
        self.diag = torch.zeros(8, dtype=torch.int64, device=device)  # the kernel's watchdog report (check)
        self.weights, self.acts, self.batch = list(weights), list(acts), batch
        self.m_tiles, self.tiles_per_page = m_tiles, tiles_per_page
        self.source, self.patience = Path(source), patience_ns()

    def run(self) -> None:
        """Queue the chain on the current stream (capturable in a CUDA graph)."""
        lib = library(self.source, self.patience)
        err = lib.ring_batch_launch(self.tasks.data_ptr(), self.task_off.data_ptr(), self.page_off.data_ptr(),
                                    self.counters.data_ptr(), None if self.prof is None else self.prof.data_ptr(),
                                    self.diag.data_ptr(), len(self.weights), self.batch, self.m_tiles,
                                    self.tiles_per_page, self.slots, self.consumers, self.grid, self.mode,
                                    torch.cuda.current_stream().cuda_stream)
        if err == CUDA_ERROR_TOO_LARGE:
            raise RuntimeError(f"ring_batch_launch: the {self.grid} blocks cannot all be resident at once (the "
                               f"kernel's registers or shared memory do not allow it), and the ring's blocks wait on "
                               f"one another")
        if err:
            raise RuntimeError(f"ring_batch_launch: {lib.ring_batch_error(err).decode()}")


WAITS = {1: "the producer's wait for its slot to be read", 2: "a consumer's wait for the layer before",
         3: "a consumer's wait for its page's copy"}


def check(chain: RingBatch) -> None:
    """Raise if a run of the chain gave up (ring_batch.cu's watchdog: a wait that had not passed after its
    patience, patience_ns), naming the wait, the block, warp and page; waits for the GPU. A run that gave up
    left its outputs incomplete."""
    what, block, warp, page, where, have, want, n = chain.diag.tolist()
    if what:
        chain.diag.zero_()
        detail = {1: f"slot {where}, use {have}, parity {want}", 2: f"layer {where - 1}'s counter at {have} of {want}",
                  3: f"slot {where}, use {have}, parity {want}"}[what]
        raise RuntimeError(f"ring_batch gave up on {WAITS[what]}: block {block}, warp {warp}, page {page} of the "
                           f"block's {n} ({detail}) after {chain.patience / 1e9:g} s (CQIL_RING_PATIENCE_S)")


def main(argv=None) -> None:
    from cqil_kernels.bench import _commit, _warm_up_gpu, copy_bandwidth_gbps, write_record
    from persistent_chain import BLOCK_M, Chain, replay_ms

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs=2, default=[4096, 11008], metavar=("D", "F"))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, action="append", help="batch rows (default 1, 8, 16, 32)")
    # defaults: the best rings at 0feb029 (3:4/32 at batch 1 and 8; 2:4/64 at 16 and 32, where x is staged)
    ap.add_argument("--slots", action="append", help="S:C rings, one variant each (default 3:4 and 2:4)")
    ap.add_argument("--rows", type=int, action="append", choices=(16, 32, 64),
                    help="rows a task (m-tiles of 16), one variant each (default 32 and 64)")
    ap.add_argument("--diagnose", action="append", help="the rings diagnosed, S:C/rows (default 2:4/64)")
    ap.add_argument("--profile", action="append", help="rings run once more with per-page stamps after the "
                                                       "timing, summarized per layer, S:C/rows (default 2:4/64)")
    ap.add_argument("--baseline", action="append", default=[], metavar="NAME=PATH",
                    help="an older ring_batch.cu with the same entry points and no x buffers (git show "
                         "REV:benchmarks/ring_batch.cu > PATH), its rings timed beside this one's in the same process "
                         "as NAME:mma-S:C/R")
    ap.add_argument("--ring-kb", type=int,
                    help=f"the ring's KiB (default {RING_KB}, or what fits beside the sums and x buffers)")
    ap.add_argument("--block-k", type=int, default=256, help="the Triton variants' BLOCK_K")
    ap.add_argument("--replays", type=int, default=20, help="chains per graph replay")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    sources = [("", SOURCE)]
    for item in a.baseline:
        name, sep, path = item.partition("=")
        if not sep or not name or not Path(path).is_file():
            ap.error(f"--baseline takes NAME=PATH of an existing .cu file, got {item!r}")
        sources.append((f"{name}:", Path(path)))
    if not torch.cuda.is_available():
        raise SystemExit("ring_batch measures GPU time and needs a CUDA device")
    device, commit = torch.device("cuda"), _commit()
    _warm_up_gpu(device, 1.0)
    copy = copy_bandwidth_gbps(device)
    chain = Chain(tuple(a.dims), a.layers, BLOCK_M, torch.bfloat16, device, block_k=a.block_k)
    weights = [chain.weight(lay) for lay in range(a.layers)]
    packs: dict[int, list[torch.Tensor]] = {}  # rows a task -> the weights packed for it, made when first asked

    def ring(spec: str, rows: int, acts, **kwargs) -> RingBatch:
        """The ring of an S:C spec with tasks of `rows` rows (--slots/--rows, or S:C/R of --diagnose/--profile)."""
        if rows not in packs:
            packs[rows] = [pack(w, rows // TILE) for w in weights]
        return RingBatch(weights, acts, ring_kb=a.ring_kb, packed=packs[rows], m_tiles=rows // TILE, **kwargs,
                         **ring_spec(spec))

    def spec_rows(spec: str) -> tuple[str, int]:
        """S:C/R as (S:C, R); R defaults to 16."""
        spec, _, rows = spec.partition("/")
        return spec, int(rows or 16)

    floor_us = chain.weight_bytes() / copy / 1e3
    width = max(a.dims)
    g = torch.Generator().manual_seed(1)
    rows, times_all, layout, profiles = [], {}, {}, {}
    for batch in a.batch or [1, 8, 16, 32]:
        buf = torch.zeros(a.layers + 1, batch, width, dtype=torch.bfloat16, device=device)
        buf[0, :, :a.dims[0]] = torch.randn(batch, a.dims[0], generator=g).to(torch.bfloat16)
        acts = [buf[lay, :, :(weights[lay].shape[1] if lay < a.layers else weights[-1].shape[0])]
                for lay in range(a.layers + 1)]
        runs, worst = {}, {}
        if batch <= BLOCK_M:
            chain.batch = batch
            for v in ("launch", "pdl"):
                runs[v] = functools.partial(chain.run, v)
        for prefix, source in sources:
            for spec in a.slots or ["3:4", "2:4"]:
                for r in a.rows or [32, 64]:
                    name = f"{prefix}mma-{spec}/{r}"
                    chained = ring(spec, r, acts, source=source, x_buffers=not prefix)
                    runs[name] = chained.run
                    layout[name] = dict(slot_bytes=chained.slot_bytes, consumers=chained.consumers,
                                        tiles_per_page=chained.tiles_per_page, source=source.name)
                    buf[1:].fill_(float("nan"))
                    chained.run()
                    try:
                        check(chained)
                    except RuntimeError as e:
                        raise RuntimeError(f"batch {batch}, {name} ({layout[name]}): {e}") from None
                    worst[name] = check_layers(chained)
        for spec, r in map(spec_rows, a.diagnose or ["2:4/64"]):
            for mode in ("stream", "compute", "compute-no-x", "compute-no-wait"):
                runs[f"mma-{spec}/{r}/{mode}"] = ring(spec, r, acts, mode=mode).run
        for run in runs.values():  # compile the Triton variants before capture
            run()
        torch.cuda.synchronize()
        graphs = {}
        for v, run in runs.items():
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(a.replays):
                    run()
            graphs[v] = graph
        times = {v: [1000 * ms / a.replays for ms in t] for v, t in replay_ms(graphs, a.rounds).items()}
        for run in runs.values():  # no replay gave up
            if isinstance(getattr(run, "__self__", None), RingBatch):
                check(run.__self__)
        for v in runs:
            us = statistics.median(times[v])
            rows.append([v, batch, a.layers, round(us, 2), round(100 * floor_us / us, 1),
                         round((us - floor_us) / a.layers, 2), round(worst[v], 3) if v in worst else None])
            print(f"batch {batch:>2} {v:>16}: {us:9.2f} us, {100 * floor_us / us:5.1f}% of copy, "
                  f"{(us - floor_us) / a.layers:6.2f} us/layer over it", flush=True)
        times_all[str(batch)] = times
        for spec, r in map(spec_rows, a.profile or ["2:4/64"]):
            profiled = ring(spec, r, acts, profile=True)
            profiled.run()
            check(profiled)
            check_layers(profiled)
            profiles[f"batch {batch}, mma-{spec}/{r}"] = summary = profile_summary(profiled)
            for row in summary[:3] + summary[-1:]:
                print(f"batch {batch:>2} mma-{spec}/{r} profile: {row}", flush=True)
    write_record(
        a.out, device=device, commit=commit,
        title="Ring chain on the tensor cores: the weight ring at batch 1 to 32, against a launch per layer",
        what=(f"chain of {a.layers} GEMMs alternating {a.dims[0]} -> {a.dims[1]} -> {a.dims[0]}, bf16, the batch "
              f"rows of each column; mma-S:C/R: one CUDA C++ launch (benchmarks/ring_batch.cu), weights packed in "
              f"mma.m16n8k16 fragment order, per SM a TMA producer filling S slots of a "
              f"{a.ring_kb or f'{RING_KB} (or what fits)'} KiB ring with "
              f"pages of R-row tasks, each page read by all C consumer warps (k-tiles split by kt % 4), "
              f"activations read from L2 (from batch {STAGED_BATCH}: staged through shared memory a page ahead by "
              f"cp.async; NAME:mma-...: the older kernel --baseline NAME=PATH, B fragments from L2 at every "
              f"batch); launch/pdl: "
              f"persistent_chain.py's Triton variants (batch <= {BLOCK_M}), BLOCK_K {a.block_k}; {a.replays} "
              f"chains per CUDA graph replay, events, medians of {a.rounds} rounds alternated"),
        copy_gbps=round(copy, 1), layout=layout, profiles=profiles, baselines=a.baseline,
        columns=["variant", "batch", "layers", "us per chain", "% of copy", "us per layer over copy",
                 "worst error / bound"],
        rows=rows, times_us=times_all)


if __name__ == "__main__":
    main()
