"""Prototype for the persistent decode step (issue 26), fifth stage: do whole LLaMA decode layers keep the ring's
gain? ring_chain.py measured ~2 us less per boundary than pdl on a GEMV chain; a decode layer has five boundaries
(QKV with RMSNorm and RoPE, attention, o_proj, gate/up with RMSNorm, down). ring_layer.cu runs L sequential layers
at batch 1 in one launch, the attention's cached keys and values streamed through the same ring as the weights.
Timed against our decode step's per-layer slope (layer_slope.py's method) in the same process:

    python benchmarks/ring_layer.py --shape llama-7b --layers 2 --layers 8 --out ring_layer.json

Both are graph-replayed. The ring's time per layer is its slope between the two layer counts, as is ours (ours
also runs the embedding, the head and argmax, which the slope cancels). Before timing, every sub-layer of every
layer of the ring's run is checked in float64 against its own inputs (check_stages). Needs an sm_90 GPU and nvcc
(ring_chain.build). On a CPU, `twin` runs the same task plan in fp32 torch (the tests).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import functools
import math
import statistics
import types
from pathlib import Path

import torch

from layer_slope import shard_overrides
from ring_batch import patience_ns
from ring_chain import SMEM_LIMIT, available, build, resident_grid  # noqa: F401 (available: the tests' condition)
from ring_chain import profile_summary as chain_profile_summary

SOURCE = Path(__file__).with_name("ring_layer.cu")
KINDS = ("qkv", "attn", "o", "gate_up", "down")  # a layer's sub-layers, in order (ring_layer.cu's Kind)
TASK_FIELDS = ("kind", "layer", "row0", "rows", "page0", "count_on", "wait_target", "first", "head", "split",
               "current", "wait_on")
LAYER_FIELDS = ("norm_in", "wqkv", "wo", "norm_post", "wgu", "wd", "k", "v", "h", "q", "part", "attn", "hmid",
                "act", "h_out", "pad")
STAMPS = ("issued", "taken", "x", "data", "stored")
MAX_ROWS = 8       # rows of a GEMV task (gate/up: of each)
MAX_POSITIONS = 256  # cached positions of an attention page
MAX_SPLITS = 64    # attention splits (pages) of a kv head (ring_layer.cu's kMaxSplits)
GROUPS = (1, 2, 3, 4)  # query heads per kv head (ring_layer.cu's kGroups)
MAX_CONSUMERS = 8
RING_KB = 172


def pair_order(Dh: int) -> torch.Tensor:
    """A head's rows in the order the QKV tasks hold them: RoPE's pairs (i, i + Dh / 2) side by side."""
    half = Dh // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], 1).flatten()


def qkv_heads(H: int, Hkv: int) -> list[int]:
    """The heads of torch.cat([wq, wk, wv]) (q heads 0..H-1, then Hkv k heads, then Hkv v heads) in the order the
    QKV weight holds them: by kv head, its G query heads, its key, its value."""
    G = H // Hkv
    return [h for kv in range(Hkv) for h in [*range(kv * G, kv * G + G), H + kv, H + Hkv + kv]]


def pack_qkv(wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, Dh: int) -> torch.Tensor:
    """[(H + 2 Hkv) Dh, D]: q, k and v's rows in qkv_heads' order, each head's rows in pair_order."""
    w = torch.cat([wq, wk, wv])
    heads = torch.tensor(qkv_heads(wq.shape[0] // Dh, wk.shape[0] // Dh))
    order = (heads[:, None] * Dh + pair_order(Dh)[None, :].to(torch.int64)).flatten()
    return w[order.to(w.device)].contiguous()


def pack_gate_up(wg: torch.Tensor, wu: torch.Tensor, rows: int) -> torch.Tensor:
    """[F / rows * 2 * rows, D]: blocks of `rows` gate rows followed by the same rows of up (one slot each)."""
    F, D = wg.shape
    return torch.stack([wg.view(F // rows, rows, D), wu.view(F // rows, rows, D)], 1).reshape(2 * F, D).contiguous()


def task_rows(N: int, row_bytes: int, slot_bytes: int, step: int = 1) -> int:
    """Rows of one task of an [N, K] weight: the largest power of two up to MAX_ROWS, a multiple of `step`, that
    divides N and whose rows (row_bytes each) fit a slot."""
    best = None
    rows = 1
    while rows <= MAX_ROWS:
        if rows % step == 0 and N % rows == 0 and rows * row_bytes <= slot_bytes:
            best = rows
        rows *= 2
    if best is None:
        raise ValueError(f"no task of {step}..{MAX_ROWS} rows of {row_bytes} bytes fits a slot of {slot_bytes} "
                         f"bytes and divides {N}")
    return best


def page_positions(Dh: int, slot_bytes: int, most: int = MAX_POSITIONS) -> int:
    """Cached positions of one attention page: keys and values of a power of two of them (at most `most`) fit a
    slot."""
    n = 1
    while n * 2 <= most and 2 * (n * 2) * Dh * 2 <= slot_bytes:
        n *= 2
    if 2 * n * Dh * 2 > slot_bytes:
        raise ValueError(f"one position's key and value ({4 * Dh} bytes) do not fit a slot of {slot_bytes}")
    return n


def split_positions(pos: int, kv_heads: int, grid: int) -> int:
    """The default cap on an attention split's cached positions: about one split per block over the kv heads (a
    power of two, at least 16), and no more than MAX_SPLITS splits. Fewer positions a task shorten the attention's
    critical path; more splits lengthen its merge (the last split's sums of every split)."""
    per = max(16, 1 << max(0, math.ceil(math.log2(max(1, pos * kv_heads / grid)))))
    while -(-pos // per) > MAX_SPLITS:
        per *= 2
    return per


def split_ranges(pos: int, per_page: int) -> list[tuple[int, int]]:
    """(first, count) of the cached positions 0..pos-1 each attention split (one page) attends to; the last split
    also attends to the current position (an empty cache: one split of no cached position)."""
    return [(first, min(per_page, pos - first)) for first in range(0, pos, per_page)] or [(0, 0)]


class Shape:
    """The dimensions one plan and its twin need (from a LlamaArgs-like object)."""

    def __init__(self, D: int, H: int, Hkv: int, Dh: int, F: int, eps: float):
        if H % Hkv or H // Hkv not in GROUPS:
            raise ValueError(f"{H} heads over {Hkv} kv heads: groups of {GROUPS} query heads only")
        if Dh % 32 or Dh > 128 or D % 8 or F % 8:
            raise ValueError(f"head_dim must be 32, 64, 96 or 128 and D, F multiples of 8; got Dh={Dh}, D={D}, F={F}")
        self.D, self.H, self.Hkv, self.Dh, self.F, self.eps = D, H, Hkv, Dh, F, eps

    @classmethod
    def of(cls, args) -> Shape:
        return cls(args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim,
                   args.intermediate_size, args.rms_norm_eps)


def counter_layout(layers: int, Hkv: int) -> tuple[int, int]:
    """(the counters array's length, the tickets' offset in it): one counter per sub-layer (5 L), one per layer and
    kv head for its QKV rows (per_head plans), then the attention's tickets (L Hkv)."""
    return 5 * layers + 2 * layers * Hkv, 5 * layers + layers * Hkv


def plan(shape: Shape, layers: int, pos: int, slot_bytes: int, grid: int, max_positions: int = MAX_POSITIONS,
         per_head: bool = False) -> dict:
    """The launch's tasks, each one page: per sub-layer (layers in order, then KINDS), its tasks in order, dealt to
    the blocks round robin (task g of the whole order to block g % grid); an attention split is one page of at most
    max_positions cached positions of one kv head. Each task counts on its sub-layer's counter and waits for the
    sub-layer before; per_head: QKV tasks count on their kv head's counter and attention waits for its own kv
    head's QKV rows only. Returns tasks [n, 12] int32 in block order, task_off [grid + 1], the rows of each GEMV
    kind, page_positions, splits (per kv head), sub_tasks (tasks per sub-layer) and counters (per counter, the
    tasks counted on it)."""
    D, H, Hkv, Dh, F = shape.D, shape.H, shape.Hkv, shape.Dh, shape.F
    rows = {"qkv": task_rows((H + 2 * Hkv) * Dh, D * 2, slot_bytes, step=2),
            "o": task_rows(D, H * Dh * 2, slot_bytes), "gate_up": task_rows(F, 2 * D * 2, slot_bytes),
            "down": task_rows(D, F * 2, slot_bytes)}  # qkv: even, and dividing Dh (a multiple of 32)
    pp = page_positions(Dh, slot_bytes, max_positions)
    ranges = split_ranges(pos, pp)
    if len(ranges) > MAX_SPLITS:
        raise ValueError(f"{pos} cached positions in pages of {pp} make {len(ranges)} splits, over {MAX_SPLITS}: "
                         f"larger pages (a larger slot or max_positions)")
    n_counters, _ = counter_layout(layers, Hkv)
    head_rows = (H // Hkv + 2) * Dh  # a kv head's QKV rows (qkv_heads' order)

    def qkv_counter(layer, row0):
        return 5 * layers + layer * Hkv + row0 // head_rows

    order, sub_tasks, counted = [], [], [0] * n_counters
    for layer in range(layers):
        for kind, name in enumerate(KINDS):
            sub = 5 * layer + kind
            if name == "attn":
                subs = [dict(kind=kind, layer=layer, row0=first, rows=count, head=head, split=s,
                             current=int(s == len(ranges) - 1),
                             wait_on=5 * layers + layer * Hkv + head if per_head else sub - 1)
                        for head in range(Hkv) for s, (first, count) in enumerate(ranges)]
            else:
                n = {"qkv": (H + 2 * Hkv) * Dh, "o": D, "gate_up": F, "down": D}[name]
                subs = [dict(kind=kind, layer=layer, row0=r0, rows=rows[name], wait_on=sub - 1)
                        for r0 in range(0, n, rows[name])]
            for t in subs:
                t["count_on"] = qkv_counter(layer, t["row0"]) if per_head and name == "qkv" else sub
                counted[t["count_on"]] += 1
            order.append(subs)
            sub_tasks.append(len(subs))
    blocks = [[] for _ in range(grid)]
    g = 0
    for subs in order:
        for t in subs:
            t["wait_target"] = counted[t["wait_on"]] if t["wait_on"] >= 0 else 0
            blocks[g % grid].append([t.get(f, 0) for f in TASK_FIELDS])
            g += 1
    table, off = [], [0]
    for mine in blocks:
        last_sub = -1
        for page, t in enumerate(mine):
            sub = 5 * t[1] + t[0]
            t[4], t[7] = page, int(sub != last_sub)
            last_sub = sub
        table += mine
        off.append(len(table))
    return dict(tasks=torch.tensor(table, dtype=torch.int32).view(-1, len(TASK_FIELDS)),
                task_off=torch.tensor(off, dtype=torch.int32), rows=rows, page_positions=pp, splits=len(ranges),
                sub_tasks=sub_tasks, counters=counted)


class RingLayers:
    """L sequential LLaMA decode layers of `model` (a CQILLlama; bf16) at batch 1 in one launch, at cache position
    `pos`: h[0] in, h[L] out, every sub-layer's output kept per layer for the checks. The caches hold random keys
    and values at positions 0..pos-1 (the prompt), the run writes position pos. On a CPU the same buffers and plan
    serve the twin. slots / ring_kb / consumers as ring_chain's (consumers must divide slots); page_positions: the
    most cached positions of one attention split (a page, at most as many as fit a slot; default
    split_positions'); grid: blocks (default one per SM); per_head: plan's (attention waits for its kv head's QKV
    rows only)."""

    MODES = {"layers": 0, "stream": 1, "compute": 2}

    def __init__(self, model, pos: int, slots: int = 4, ring_kb: int = RING_KB, consumers: int | None = None,
                 page_positions: int | None = None, grid: int | None = None, profile: bool = False, seed: int = 0,
                 per_head: bool = False):
        args = model.args
        self.shape = s = Shape.of(args)
        device = model.device
        self.L, self.pos, self.S = args.num_hidden_layers, pos, pos + 1
        self.consumers = consumers or min(slots, MAX_CONSUMERS)
        if not 1 <= self.consumers <= MAX_CONSUMERS or slots % self.consumers:
            raise ValueError(f"consumers must be 1..{MAX_CONSUMERS} and divide slots={slots}, got {self.consumers}")
        self.grid = resident_grid(device, grid) if device.type == "cuda" else (grid or 4)
        self.target = target = (ring_kb * 1024 // slots) // 16 * 16  # a slot's bytes at most
        self.per_head = per_head
        self.plan = plan(s, self.L, pos, target, self.grid,
                         page_positions or min(MAX_POSITIONS, split_positions(pos, s.Hkv, self.grid)), per_head)
        self.splits = self.plan["splits"]
        rows = self.plan["rows"]
        pp = self.plan["page_positions"]
        self.slot_bytes = max(rows["qkv"] * s.D * 2, rows["o"] * s.H * s.Dh * 2, 2 * rows["gate_up"] * s.D * 2,
                              rows["down"] * s.F * 2, 2 * pp * s.Dh * 2)
        self.slots = slots
        self.x_bytes = max(s.D, s.H * s.Dh, s.F) * 2
        smem = slots * self.slot_bytes + 2 * self.x_bytes + 2 * slots * 8 + 16
        if smem > SMEM_LIMIT:
            raise ValueError(f"{slots} slots of {self.slot_bytes} bytes and x buffers of {self.x_bytes} need {smem} "
                             f"bytes of shared memory, over {SMEM_LIMIT}")
        g = torch.Generator().manual_seed(seed)
        bf = dict(dtype=torch.bfloat16, device=device)

        def rand(*size, scale=1.0):
            return (torch.randn(*size, generator=g) * scale).to(**bf)

        self.layers = []
        for layer in model.layers:  # copies: the model's own weights may be repacked under it
            at, mlp = layer.self_attn, layer.mlp
            w = {name: mod.weight.detach().to(**bf).clone() for name, mod in (
                ("norm_in", layer.input_layernorm), ("norm_post", layer.post_attention_layernorm),
                ("wq", at.q_proj), ("wk", at.k_proj), ("wv", at.v_proj), ("wo", at.o_proj), ("wg", mlp.gate_proj),
                ("wu", mlp.up_proj), ("wd", mlp.down_proj))}
            self.layers.append(dict(
                w, wqkv=pack_qkv(w["wq"], w["wk"], w["wv"], s.Dh), wgu=pack_gate_up(w["wg"], w["wu"], rows["gate_up"]),
                k=rand(s.Hkv, self.S, s.Dh), v=rand(s.Hkv, self.S, s.Dh),
                q=torch.zeros(s.H * s.Dh, **bf), attn=torch.zeros(s.H * s.Dh, **bf),
                part=torch.zeros(s.H, self.splits, s.Dh + 2, dtype=torch.float32, device=device),
                hmid=torch.zeros(s.D, **bf), act=torch.zeros(s.F, **bf)))
        self.h = [rand(s.D)] + [torch.zeros(s.D, **bf) for _ in range(self.L)]
        for i, lw in enumerate(self.layers):
            lw["h"], lw["h_out"] = self.h[i], self.h[i + 1]
        self.inv_freq = model.inv_freq.to(device=device, dtype=torch.float32).contiguous()
        self.tasks = self.plan["tasks"].to(device)
        self.task_off = self.plan["task_off"].to(device)
        self.table = torch.tensor([[lw[f].data_ptr() if f != "pad" else 0 for f in LAYER_FIELDS]
                                   for lw in self.layers], dtype=torch.int64).to(device)
        self.n_counters, self.tickets_at = counter_layout(self.L, s.Hkv)
        self.counters = torch.zeros(self.n_counters, dtype=torch.int32, device=device)
        self.diag = torch.zeros(8, dtype=torch.int64, device=device)
        self.prof = torch.zeros(self.tasks.shape[0], len(STAMPS), dtype=torch.int64, device=device) if profile else None
        self.patience = patience_ns()

    def variant(self, per_head: bool) -> RingLayers:
        """The same layers, weights and buffers under plan(per_head=...): runs of either (one at a time, on one
        stream) compute the same outputs from h[0]."""
        other = copy.copy(self)
        other.per_head = per_head
        other.plan = plan(self.shape, self.L, self.pos, self.target, self.grid,
                          self.plan["page_positions"], per_head)
        device = self.tasks.device
        other.tasks, other.task_off = other.plan["tasks"].to(device), other.plan["task_off"].to(device)
        other.counters, other.diag = torch.zeros_like(self.counters), torch.zeros_like(self.diag)
        other.prof = None if self.prof is None else torch.zeros_like(self.prof)
        return other

    def ints(self, mode: str = "layers") -> list[int]:
        s = self.shape
        return [s.D, s.H, s.Hkv, s.Dh, s.F, self.S, self.pos, self.splits, self.slot_bytes, self.slots, self.x_bytes,
                self.plan["page_positions"], self.consumers, self.grid, self.n_counters, self.MODES[mode],
                self.tickets_at]

    def run(self, mode: str = "layers") -> None:
        """Queue the launch on the current stream (capturable); check() reads whether it gave up. mode: "layers",
        or a diagnostic whose outputs are meaningless (every wait kept; a later "layers" run computes them again
        from h[0]): "stream", the pages streamed and no products; "compute", the products of whatever the slots
        hold and no page copied."""
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {sorted(self.MODES)}, got {mode!r}")
        lib = library(SOURCE, self.patience)
        ints = (ctypes.c_int * 17)(*self.ints(mode))
        err = lib.ring_layer_launch(self.tasks.data_ptr(), self.task_off.data_ptr(), self.table.data_ptr(),
                                    self.counters.data_ptr(), self.inv_freq.data_ptr(),
                                    None if self.prof is None else self.prof.data_ptr(), self.diag.data_ptr(), ints,
                                    ctypes.c_float(self.shape.eps), torch.cuda.current_stream().cuda_stream)
        if err:
            raise RuntimeError(f"ring_layer_launch: {lib.ring_layer_error(err).decode()}")


WAITS = {1: "the producer's wait for a free slot", 2: "a wait for the sub-layer before",
         3: "a wait for the block's staged x", 4: "a wait for a slot's bytes"}


def check(ring: RingLayers) -> None:
    """Raise if the last run gave up (the watchdog), naming the wait, block, warp and task; waits for the GPU."""
    what, block, warp, task, where, have, want, n = ring.diag.tolist()
    if what:
        ring.diag.zero_()
        kind, layer = ring.plan["tasks"][task, :2].tolist()
        raise RuntimeError(f"ring_layer gave up on {WAITS[what]}: block {block} (of {n} tasks), warp {warp}, task "
                           f"{task} ({KINDS[kind]} of layer {layer}): at {where}, saw {have}, wanted {want}, after "
                           f"{ring.patience / 1e9:g} s (CQIL_RING_PATIENCE_S)")


@functools.cache
def library(source: Path, patience: int) -> ctypes.CDLL:
    so = build(source, (f"RING_PATIENCE_NS={patience}LL",))
    so.ring_layer_launch.restype = ctypes.c_int
    so.ring_layer_launch.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_float, ctypes.c_void_p]
    so.ring_layer_error.restype = ctypes.c_char_p
    so.ring_layer_error.argtypes = [ctypes.c_int]
    return so


# ---- the twin: ring_layer.cu's plan run task by task in fp32 torch, the same roundings at the same points ----

def _bf(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def _normed(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(bf16(x * w) as fp32, 1/rms(x) in fp32): the staged operand of a normed GEMV."""
    x = x.float()
    return _bf(x * w.float()), torch.rsqrt((x * x).sum() / x.numel() + eps)


def _rope(a: torch.Tensor, b: torch.Tensor, angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()


def twin(ring: RingLayers) -> None:
    """Run ring's plan on its buffers (any device) in fp32, task by task in the plan's sub-layer order."""
    s, pos, pp = ring.shape, ring.pos, ring.plan["page_positions"]
    G, half = s.H // s.Hkv, s.Dh // 2
    scale = math.log2(math.e) / math.sqrt(s.Dh)
    tasks = sorted(ring.plan["tasks"].tolist(), key=lambda t: (5 * t[1] + t[0]))  # stable: the plan's order
    staged, finished = {}, {}
    heads = qkv_heads(s.H, s.Hkv)
    for kind, layer, row0, rows, _, _, _, _, head, split, current, _ in tasks:
        lw, name = ring.layers[layer], KINDS[kind]
        sub = 5 * layer + kind
        if sub not in staged:  # what a block's first task of the sub-layer stages
            if name == "qkv":
                staged[sub] = _normed(lw["h"], lw["norm_in"], s.eps)
            elif name == "gate_up":
                staged[sub] = _normed(lw["hmid"], lw["norm_post"], s.eps)
            elif name == "o":
                staged[sub] = (lw["attn"].float(), None)
            elif name == "down":
                staged[sub] = (lw["act"].float(), None)
        if name == "attn":
            q = lw["q"].float().view(s.H, s.Dh)[head * G:(head + 1) * G] * scale
            keys = list(range(row0, row0 + rows)) + ([pos] if current else [])
            assert rows <= pp
            out = lw["part"][head * G:(head + 1) * G, split]
            if keys:
                k, v = lw["k"][head, keys].float(), lw["v"][head, keys].float()
                sc = q @ k.t()
                m = sc.amax(1)
                e = torch.exp2(sc - m[:, None])
                out[:, :s.Dh], out[:, s.Dh], out[:, s.Dh + 1] = e @ v, m, e.sum(1)
            else:
                out[:, :s.Dh], out[:, s.Dh], out[:, s.Dh + 1] = 0.0, -math.inf, 0.0
            finished[layer, head] = finished.get((layer, head), 0) + 1
            if finished[layer, head] == ring.splits:  # the kv head's last split merges its query heads' splits
                part = lw["part"][head * G:(head + 1) * G]
                w = torch.exp2(part[..., s.Dh] - part[..., s.Dh].amax(1, keepdim=True))
                merged = (w[..., None] * part[..., :s.Dh]).sum(1) / (w * part[..., s.Dh + 1]).sum(1)[:, None]
                lw["attn"].view(s.H, s.Dh)[head * G:(head + 1) * G] = merged
            continue
        x, rstd = staged[sub]
        if name == "qkv":
            sums = _bf((lw["wqkv"][row0:row0 + rows].float() @ x) * rstd)
            for r in range(0, rows, 2):
                row = row0 + r
                hd, i = heads[row // s.Dh], (row % s.Dh) // 2  # the head in torch.cat([wq, wk, wv])'s order
                a, b = sums[r], sums[r + 1]
                if hd < s.H + s.Hkv:
                    a, b = _rope(a, b, torch.tensor(pos, dtype=torch.float32) * ring.inv_freq[i].cpu().to(a.device))
                dst = (lw["q"].view(s.H, s.Dh)[hd] if hd < s.H else
                       lw["k"][hd - s.H, pos] if hd < s.H + s.Hkv else lw["v"][hd - s.H - s.Hkv, pos])
                dst[i], dst[i + half] = a, b
        elif name == "gate_up":
            sums = lw["wgu"][2 * row0:2 * (row0 + rows)].float() @ x
            g_, u = sums[:rows] * rstd, sums[rows:] * rstd
            lw["act"][row0:row0 + rows] = g_ / (1 + torch.exp(-g_)) * u
        else:
            w, res, out = (lw["wo"], lw["h"], lw["hmid"]) if name == "o" else (lw["wd"], lw["hmid"], lw["h_out"])
            out[row0:row0 + rows] = res[row0:row0 + rows].float() + w[row0:row0 + rows].float() @ x


# ---- float64 checks of each sub-layer against its own inputs (the kernel's or the twin's buffers) ----

U = 2.0 ** -7   # one bf16 unit in the last place, relative (a rounding moves a value by at most half of it)
E32 = 2.0 ** -24  # fp32's unit roundoff


def _gemv_bound(w: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W x in float64, the fp32 sum's error bound: twice K u sum |w x|)."""
    w64, x64 = w.double(), x.double()
    return w64 @ x64, 2 * w.shape[1] * E32 * (w64.abs() @ x64.abs())


def _ratio(name: str, got: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> float:
    err = (got.double() - ref).abs()
    ratio = (err / bound.clamp_min(1e-300)).max().item()
    if not ratio <= 1:
        at = int((err / bound.clamp_min(1e-300)).argmax())
        raise AssertionError(f"{name}: error {err.flatten()[at].item():.3e} at {at} over its bound "
                             f"{bound.flatten()[at].item():.3e} (ratio {ratio:.2f})")
    return ratio


def check_stages(ring: RingLayers) -> dict[str, float]:
    """Each sub-layer of each layer against float64 from its own inputs in the run's buffers, within bounds from
    the arithmetic (bf16 roundings, fp32 sums): q, k and v at `pos`; the merged attention from the q and cache
    the run left; h_mid from the merged attention; the activations from h_mid; h_out from them. Returns the
    largest error / bound per sub-layer; raises where one is over 1."""
    s, pos = ring.shape, ring.pos
    G, half = s.H // s.Hkv, s.Dh // 2
    worst = dict.fromkeys(KINDS, 0.0)
    inv_freq = ring.inv_freq.cpu().double()
    for layer, on_device in enumerate(ring.layers):  # one layer's tensors on the host at a time (7B: ~0.7 GB each)
        lw = {k: v.cpu() for k, v in on_device.items()}
        # QKV: RMSNorm's operand bf16(h * w) as the kernel stages it, 1/rms in float64 (the kernel's fp32 sum of
        # squares and rsqrt: within (D + 2) u of it), the sums rounded to bf16, then rotated in fp32
        h = lw["h"].float()
        xhat = _bf(h * lw["norm_in"].float())
        rstd = 1 / math.sqrt((h.double() ** 2).mean().item() + s.eps)
        w = torch.cat([lw["wq"], lw["wk"], lw["wv"]])
        a, ea = _gemv_bound(w, xhat)
        a, ea = a * rstd, ea * rstd + (s.D + 4) * E32 * (a * rstd).abs()
        ea = ea + U * a.abs()  # the kernel rounds the sums before rotating them
        heads = a.view(-1, s.Dh)
        eh = ea.view(-1, s.Dh)
        angle = pos * inv_freq  # the kernel's fp32 product: within u of it; sin/cos within 2 u
        cos, sin = angle.cos(), angle.sin()
        ang_err = (angle.abs() + 2) * 2 * E32
        x1, x2, e1, e2 = heads[:, :half], heads[:, half:], eh[:, :half], eh[:, half:]
        y1, y2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        rot_err = ang_err * (x1.abs() + x2.abs())
        b1 = cos.abs() * e1 + sin.abs() * e2 + rot_err + U * y1.abs() + 4 * E32 * (x1.abs() + x2.abs())
        b2 = cos.abs() * e2 + sin.abs() * e1 + rot_err + U * y2.abs() + 4 * E32 * (x1.abs() + x2.abs())
        rot = torch.cat([y1, y2], 1)
        brot = torch.cat([b1, b2], 1)
        nq, nk = s.H, s.Hkv
        got = torch.cat([lw["q"].view(s.H, s.Dh), lw["k"][:, pos], lw["v"][:, pos]])
        ref = torch.cat([rot[:nq + nk], heads[nq + nk:]])
        bnd = torch.cat([brot[:nq + nk], eh[nq + nk:]])
        worst["qkv"] = max(worst["qkv"], _ratio(f"layer {layer} qkv", got, ref, bnd))
        # attention: softmax(q k / sqrt(Dh)) v per head over positions 0..pos of the cache the run left
        q = lw["q"].double().view(s.H, s.Dh)
        k = lw["k"][:, :pos + 1].double().repeat_interleave(G, 0)
        v = lw["v"][:, :pos + 1].double().repeat_interleave(G, 0)
        sc = torch.einsum("hd,hsd->hs", q, k) / math.sqrt(s.Dh)
        p = torch.softmax(sc, -1)
        o = torch.einsum("hs,hsd->hd", p, v)
        # a score's fp32 error (Dh products, the scale) moves its weight by ln 2 times it in log2 units; each
        # weight's exp2f, rescalings and sums over n positions and the splits add (n + splits + 4) u
        sc_err = (s.Dh + 2) * E32 * torch.einsum("hd,hsd->hs", q.abs(), k.abs()).amax(1) / math.sqrt(s.Dh) * 1.45
        rel = 2 * sc_err + (pos + ring.splits + 8) * 4 * E32
        bound = U * o.abs() + 2 * rel[:, None] * v.abs().amax(1)
        worst["attn"] = max(worst["attn"], _ratio(f"layer {layer} attention", lw["attn"].view(s.H, s.Dh), o, bound))
        # o_proj + h, gate/up (RMSNorm of h_mid), down + h_mid: each from the run's own input
        prod, err = _gemv_bound(lw["wo"], lw["attn"].float())
        ref = lw["h"].double() + prod
        worst["o"] = max(worst["o"], _ratio(f"layer {layer} o_proj", lw["hmid"], ref, U * ref.abs() + err))
        hm = lw["hmid"].float()
        xhat = _bf(hm * lw["norm_post"].float())
        rstd = 1 / math.sqrt((hm.double() ** 2).mean().item() + s.eps)
        gp, eg = _gemv_bound(lw["wg"], xhat)
        up, eu = _gemv_bound(lw["wu"], xhat)
        gp, up = gp * rstd, up * rstd
        eg, eu = eg * rstd + (s.D + 4) * E32 * gp.abs(), eu * rstd + (s.D + 4) * E32 * up.abs()
        sig = torch.sigmoid(gp)
        act = gp * sig * up
        bound = U * act.abs() + 1.1 * up.abs() * eg + (gp * sig).abs() * eu + 8 * E32 * act.abs()
        worst["gate_up"] = max(worst["gate_up"], _ratio(f"layer {layer} gate/up", lw["act"], act, bound))
        prod, err = _gemv_bound(lw["wd"], lw["act"].float())
        ref = lw["hmid"].double() + prod
        worst["down"] = max(worst["down"], _ratio(f"layer {layer} down", lw["h_out"], ref, U * ref.abs() + err))
    return worst


def profile_summary(ring: RingLayers) -> list[dict]:
    """ring_chain.profile_summary of the last profiled run (every task one page, stamped as a chain's tasks are),
    per sub-layer in place of a chain's layer: the waits for the input ("wait x") and the page ("wait data"), the
    compute, and "boundary", from the sub-layer before's last store to this one's first task holding its input;
    each row names its layer and kind."""
    subs = 5 * ring.plan["tasks"][:, 1] + ring.plan["tasks"][:, 0]
    chain = types.SimpleNamespace(weights=range(5 * ring.L), prof=ring.prof, task_layers=subs)
    rows = []
    for row in chain_profile_summary(chain):
        sub = row.pop("layer")
        rows.append({"layer": sub // 5, "kind": KINDS[sub % 5], **row})
    return rows


@torch.inference_mode()
def main(argv=None) -> None:
    from cqil_kernels import CQILConfig
    from cqil_kernels.bench import (_commit, _time_ours, _warm_up_gpu, copy_bandwidth_gbps, decode_step_bytes,
                                    random_model, shape_args, write_record)
    from cqil_kernels.ops._common import capture_launches, replay_median_us

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-7b")
    ap.add_argument("--tp", type=int, default=1,
                    help="the layer one rank of T-way tensor parallelism runs (heads and intermediate size / T, as "
                         "layer_slope.py's --tp), for both ours and the ring")
    ap.add_argument("--layers", type=int, action="append", help="two layer counts (default 2 and 8)")
    ap.add_argument("--prompt", type=int, default=512, help="cached positions")
    ap.add_argument("--slots", default="4", help="S or S:C, as ring_chain.py's")
    ap.add_argument("--page-positions", type=int, default=None,
                    help="the most cached positions of one attention split (default split_positions')")
    ap.add_argument("--new", type=int, default=64, help="our decode steps timed per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="also one profiled run of the larger model")
    ap.add_argument("--diagnose", action="store_true",
                    help="also time the stream-only and compute-only diagnostics (RingLayers.run's modes)")
    ap.add_argument("--per-head", action="store_true",
                    help="also time the per-head plan (attention waits for its own kv head's QKV rows only)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    lo, hi = sorted(a.layers or [2, 8])
    if len(a.layers or [2, 8]) != 2 or lo < 1 or hi <= lo:
        raise SystemExit("--layers: two different counts >= 1")
    if not torch.cuda.is_available():
        raise SystemExit("ring_layer measures GPU time and needs a CUDA device")
    slots, _, consumers = a.slots.partition(":")
    device, dtype, commit = torch.device("cuda"), torch.bfloat16, _commit()
    _warm_up_gpu(device, 1.0)
    copy_gbps = copy_bandwidth_gbps(device)
    over = {n: shard_overrides(a.shape, a.tp, n) for n in (lo, hi)}
    models = {n: random_model(a.shape, dtype, device, **over[n]) for n in (lo, hi)}
    rings, checks = {}, {}
    for n, model in models.items():
        model.cqil, model.backend = CQILConfig(), "triton"
        rings[n] = RingLayers(model, a.prompt, slots=int(slots), consumers=int(consumers) if consumers else None,
                              page_positions=a.page_positions)
        rings[n].run()
        check(rings[n])
        checks[n] = {k: round(v, 3) for k, v in check_stages(rings[n]).items()}
        print(f"{n} layers: every sub-layer within its bound (largest error / bound {checks[n]})", flush=True)
    # variant name -> (ring of each layer count, RingLayers.run's mode)
    variants = {"layers": (rings, "layers")}
    if a.per_head:
        variants["per-head"] = ({n: ring.variant(per_head=True) for n, ring in rings.items()}, "layers")
        for n, ring in variants["per-head"][0].items():
            want = rings[n].h[-1].clone()
            ring.run()
            check(ring)
            if not torch.equal(ring.h[-1], want):
                raise AssertionError(f"{n} layers: the per-head plan's output differs from the sub-layer plan's")
    if a.diagnose:
        variants.update(stream=(rings, "stream"), compute=(rings, "compute"))
    ids = torch.randint(0, models[lo].args.vocab_size, (1, a.prompt), device=models[lo].device)
    ours, ring_us = {n: [] for n in models}, {v: {n: [] for n in models} for v in variants}
    for r in range(a.rounds):
        for n in ((lo, hi) if r % 2 == 0 else (hi, lo)):
            ours[n].append(_time_ours(models[n], ids, a.new, a.repeats)[1] * 1e3)
            for v, (ring_of, mode) in variants.items():
                graph = capture_launches(lambda i, ring=ring_of[n], mode=mode: ring.run(mode), 20)
                ring_us[v][n].append(replay_median_us(graph, 20, 10))
                check(ring_of[n])
            print(f"round {r} {n:>3} layers: ours {ours[n][-1]:.1f} us/step, ring "
                  + ", ".join(f"{v} {ring_us[v][n][-1]:.1f}" for v in variants) + " us", flush=True)
    rings[hi].run()  # the outputs of the layers again, after the diagnostics
    check(rings[hi])
    step_bytes = {n: decode_step_bytes(shape_args(a.shape, **over[n]), dtype, 1, a.prompt) for n in models}
    layer_bytes = (step_bytes[hi] - step_bytes[lo]) / (hi - lo)
    floor_us = layer_bytes / copy_gbps / 1e3
    rows = []
    names = {"layers": "ring_layer (one launch)", "per-head": "ring_layer, attention waiting per kv head",
             "stream": "ring_layer stream only (diagnostic)", "compute": "ring_layer compute only (diagnostic)"}
    for name, t in [("ours (graph-replayed decode step)", ours)] + [(names[v], ring_us[v]) for v in variants]:
        t_lo, t_hi = statistics.median(t[lo]), statistics.median(t[hi])
        slope = (t_hi - t_lo) / (hi - lo)
        share = round(100 * floor_us / slope, 1) if slope > 0 else None  # (no share of a slope at or below zero)
        rows.append([name, round(t_lo, 1), round(t_hi, 1), round(slope, 2), round(slope - floor_us, 2), share])
        print(f"{name}: {slope:.2f} us a layer, {slope - floor_us:.2f} over copy ({share}% of copy)", flush=True)
    profile = None
    if a.profile:
        prof = RingLayers(models[hi], a.prompt, slots=int(slots), consumers=int(consumers) if consumers else None,
                          page_positions=a.page_positions, profile=True)
        prof.run()
        check(prof)
        profile = profile_summary(prof)
    ring = rings[hi]
    write_record(
        a.out, device=device, commit=commit,
        title=(f"Whole decode layers in one ring launch against our decode step, per layer: {a.shape}"
               + (f", the TP{a.tp} shard's layer" if a.tp > 1 else "")),
        what=(f"batch 1, bf16, {a.prompt} cached positions, sequential; ours: cqil_kernels.bench._time_ours ({a.new} "
              f"steps x {a.repeats} repeats, graph-replayed); ring: a CUDA graph of 20 launches, median of 10; "
              f"{lo} and {hi} layers alternated over {a.rounds} rounds, medians; per layer = the slope"),
        copy_gbps=round(copy_gbps, 1), layer_mb=round(layer_bytes / 1e6, 2), floor_us=round(floor_us, 2),
        ring=dict(slots=ring.slots, consumers=ring.consumers, slot_bytes=ring.slot_bytes, splits=ring.splits,
                  grid=ring.grid, rows=ring.plan["rows"], page_positions=ring.plan["page_positions"]),
        checks=checks,
        columns=["variant", f"us at {lo} layers", f"us at {hi} layers", "us per layer", "over copy us", "% of copy"],
        rows=rows, times_us={"ours": ours, "ring": ring_us}, profile=profile)


if __name__ == "__main__":
    main()
