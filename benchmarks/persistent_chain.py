"""Prototype for the persistent decode step (issue 26): does one launch with per-task counters take away
the fixed cost a kernel boundary adds to every layer step?

    python benchmarks/persistent_chain.py --dims 4096 11008 --layers 8 --batch 1 --out chain.json

The workload is the weight stream of decode with nothing else in it: a chain of GEMVs, out_l = out_{l-1}
@ W_l^T, whose layers alternate D -> F and F -> D (the 7B MLP's shapes with --dims 4096 11008). Every
variant runs the same tile (BLOCK_N output columns of one layer, a loop over K in BLOCK_K chunks on the
tensor cores, as ops/group_gemm.py's decode tiles), so they differ only in how one tile waits for the
layer before it:

  launch        one kernel launch per layer, each after the last (stream order)
  pdl           one launch per layer with programmatic dependent launch, wait first (today's kernels)
  pdl-prefetch  as pdl, but the tile's first weight chunk is loaded before the wait: weights never depend
                on the layer before, so their stream can start while it finishes
  persistent    one launch for the whole chain: programs take tiles in order from a ticket counter and a
                tile of layer l waits (spinning on a counter) until every tile of layer l-1 has stored;
                its first weight chunk is loaded before the wait
  dataflow      as persistent, but while layer l-1 still runs a tile of layer l goes chunk by chunk of K,
                each once the tiles of layer l-1 that store it are done (a counter per chunk), each weight
                chunk loaded before its wait: no layer barrier, so no tail

All variants give bit-identical results (the same tile code in the same order; tested in
tests/test_persistent_chain.py on the interpreter). Each variant is replayed from a CUDA graph and timed
with events; variants alternate, order reversed every other round; medians. The device-to-device copy of
the same run is the bound, as in cqil bench.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import triton
import triton.language as tl

from cqil_kernels.ops._common import dot_flags

VARIANTS = ("launch", "pdl", "pdl-prefetch", "persistent", "dataflow")
BLOCK_M = 16  # decode rows, padded to one tensor-core tile as in ops/group_gemm.py


@triton.jit
def _wait_count(counter_ptr, target):
    """Spin until *counter_ptr >= target (acquire: the stores counted there are visible after)."""
    seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")


@triton.jit
def _release(counter_ptr):
    """*counter_ptr += 1 (release) once every thread of the program has made its stores."""
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _dot(x, w, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:  # ops/_common.dot_flags: the interpreter's bf16 arithmetic is wrong
        x, w = x.to(tl.float32), w.to(tl.float32)
    return tl.dot(x, w, acc, input_precision=PRECISION)


@triton.jit
def _tile(x_ptr, w_ptr, out_ptr, M, N, K, stride_x, stride_o, pid_n, wait_ptr, wait_target, chunk_ptr,
          chunk_target, WAIT: tl.constexpr, PREFETCH: tl.constexpr, FORCE_CHUNKS: tl.constexpr,
          UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr):
    """out[:M, pid_n*BLOCK_N:+BLOCK_N] = x[:M, :K] @ w[cols, :K]^T. WAIT: 0 none, 1 griddepcontrol.wait,
    2 spin until *wait_ptr >= wait_target (the whole layer before), 3 the same where the layer before is
    already complete, else chunk by chunk: K chunk c once chunk_ptr[c] >= chunk_target (the tiles that
    store those columns of x; FORCE_CHUNKS: always so, the CPU tests' way to the chunked loop).
    PREFETCH: the first weight chunk is loaded before any wait."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m[:, None] < M
    w_cols = w_ptr + offs_n[None, :] * K
    x_rows = x_ptr + offs_m[:, None] * stride_x
    if PREFETCH:
        w0 = tl.load(w_cols + offs_k[:, None])
    if WAIT == 1:
        tl.extra.cuda.gdc_wait()
    if WAIT == 2:
        _wait_count(wait_ptr, wait_target)
    chunked = False
    if WAIT == 3:
        if FORCE_CHUNKS:
            chunked = True
        else:
            chunked = tl.atomic_add(wait_ptr, 0, sem="acquire", scope="gpu") < wait_target
    if not PREFETCH:
        w0 = tl.load(w_cols + offs_k[:, None])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # x was written by other programs of this launch (persistent): read it from L2, not a stale L1 line
    if chunked:  # the layer before is still running: each chunk of x once its producers have stored it
        _wait_count(chunk_ptr, chunk_target)
        x0 = tl.load(x_rows + offs_k[None, :], mask=m_ok, other=0.0, cache_modifier=".cg")
        acc = _dot(x0, w0, acc, UPCAST, PRECISION)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            k = k0 + offs_k
            wk = tl.load(w_cols + k[:, None])  # issued before the wait: weights never depend on it
            _wait_count(chunk_ptr + k0 // BLOCK_K, chunk_target)
            xk = tl.load(x_rows + k[None, :], mask=m_ok, other=0.0, cache_modifier=".cg")
            acc = _dot(xk, wk, acc, UPCAST, PRECISION)
    else:
        x0 = tl.load(x_rows + offs_k[None, :], mask=m_ok, other=0.0, cache_modifier=".cg")
        acc = _dot(x0, w0, acc, UPCAST, PRECISION)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            k = k0 + offs_k
            xk = tl.load(x_rows + k[None, :], mask=m_ok, other=0.0, cache_modifier=".cg")
            acc = _dot(xk, tl.load(w_cols + k[:, None]), acc, UPCAST, PRECISION)
    if WAIT == 1:
        tl.extra.cuda.gdc_launch_dependents()
    tl.store(out_ptr + offs_m[:, None] * stride_o + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=m_ok)


@triton.jit
def _layer_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_x, stride_o,
                  WAIT: tl.constexpr, PREFETCH: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _tile(x_ptr, w_ptr, out_ptr, M, N, K, stride_x, stride_o, tl.program_id(0), x_ptr, 0, x_ptr, 0,
          WAIT, PREFETCH, False, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _chain_kernel(act_ptr, w_ptr, state_ptr, M, D, F, n_layers, stride_act, CHUNKS,
                  WAIT: tl.constexpr, FORCE_CHUNKS: tl.constexpr, UPCAST: tl.constexpr,
                  PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The whole chain in one launch. state_ptr (zeroed before the launch): [0] the ticket counter,
    [1 + l] tiles of layer l stored, [1 + n_layers + l * CHUNKS + c] tiles of layer l stored whose
    columns fall in K chunk c of layer l + 1 (DATAFLOW). Tile t of the chain: layers in order, then
    columns; a tile only waits on tiles of lower tickets, all taken by running programs, so no order of
    scheduling can deadlock. WAIT (_tile's): 3, dataflow: a tile of layer l starts on its first chunks
    while the last tiles of layer l - 1 still run; 2: it waits for all of them."""
    tiles_even, tiles_odd = F // BLOCK_N, D // BLOCK_N  # layer 2i: D -> F, layer 2i+1: F -> D
    pair = tiles_even + tiles_odd
    total = (n_layers // 2) * pair + (n_layers % 2) * tiles_even
    layer_elems = D * F
    chunks_base = state_ptr + 1 + n_layers
    t = tl.atomic_add(state_ptr, 1)
    while t < total:
        t_next = tl.atomic_add(state_ptr, 1)  # the next ticket's latency hides behind this tile
        odd = (t % pair) >= tiles_even
        layer = 2 * (t // pair) + odd.to(tl.int32)
        pid_n = t % pair - odd.to(tl.int32) * tiles_even
        N = tl.where(odd, D, F)
        K = tl.where(odd, F, D)
        first = layer == 0
        target = tl.where(first, 0, tl.where(odd, tiles_even, tiles_odd))
        x = act_ptr + layer * BLOCK_M * stride_act
        out = x + BLOCK_M * stride_act
        w = w_ptr + layer.to(tl.int64) * layer_elems
        prev_chunks = chunks_base + tl.where(first, 0, layer - 1) * CHUNKS
        _tile(x, w, out, M, N, K, stride_act, stride_act, pid_n, state_ptr + layer, target, prev_chunks,
              tl.where(first, 0, BLOCK_K // BLOCK_N), WAIT, True, FORCE_CHUNKS, UPCAST, PRECISION,
              BLOCK_M, BLOCK_N, BLOCK_K)
        _release(state_ptr + 1 + layer)
        if WAIT == 3:
            tl.atomic_add(chunks_base + layer * CHUNKS + pid_n * BLOCK_N // BLOCK_K, 1, sem="release", scope="gpu")
        t = t_next


class Chain:
    """Weights, activations and launch settings of one chain; run(variant) queues one forward."""

    def __init__(self, dims: tuple[int, int], layers: int, batch: int, dtype: torch.dtype,
                 device: torch.device, block_n: int = 32, block_k: int = 256, num_warps: int = 4,
                 num_stages: int = 4, programs_per_sm: int = 2, seed: int = 0):
        D, F = dims
        if not 1 <= batch <= BLOCK_M:
            raise ValueError(f"batch must be 1..{BLOCK_M}, got {batch}")
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        for name, d in (("D", D), ("F", F)):
            if d % block_n or d % block_k:
                raise ValueError(f"{name}={d} must be a multiple of block_n={block_n} and block_k={block_k}")
        g = torch.Generator().manual_seed(seed)
        self.D, self.F, self.layers, self.batch = D, F, layers, batch
        # one flat buffer, layer l at l*D*F: [F, D] for even l (D -> F), [D, F] for odd l
        self.w = (torch.randn(layers * D * F, generator=g) / (min(D, F) ** 0.5)).to(dtype).to(device)
        self.width = max(D, F)
        self.act = torch.zeros(layers + 1, BLOCK_M, self.width, dtype=dtype, device=device)
        self.act[0, :batch, :D] = torch.randn(batch, D, generator=g).to(dtype)
        self.state = torch.zeros(1 + layers + layers * self.width // block_k, dtype=torch.int32, device=device)
        self.force_chunks = False  # dataflow: every tile takes the chunked loop (the CPU tests)
        upcast, precision = dot_flags(dtype)
        self.meta = dict(UPCAST=upcast, PRECISION=precision, BLOCK_M=BLOCK_M, BLOCK_N=block_n,
                         BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
        else:
            sms = 1
        self.programs = sms * programs_per_sm

    def layer_shape(self, layer: int) -> tuple[int, int]:
        """(N, K) of layer `layer`."""
        return (self.F, self.D) if layer % 2 == 0 else (self.D, self.F)

    def weight(self, layer: int) -> torch.Tensor:
        N, K = self.layer_shape(layer)
        return self.w[layer * self.D * self.F:(layer + 1) * self.D * self.F].view(N, K)

    def weight_bytes(self) -> int:
        return self.w.numel() * self.w.element_size()

    def output(self) -> torch.Tensor:
        N, _ = self.layer_shape(self.layers - 1)
        return self.act[self.layers, :self.batch, :N]

    def run(self, variant: str) -> None:
        if variant in ("persistent", "dataflow"):
            self.state.zero_()
            _chain_kernel[(self.programs,)](self.act, self.w, self.state, self.batch, self.D, self.F,
                                            self.layers, self.act.stride(1), self.width // self.meta["BLOCK_K"],
                                            WAIT=3 if variant == "dataflow" else 2,
                                            FORCE_CHUNKS=self.force_chunks, **self.meta)
            return
        wait, prefetch, pdl = {"launch": (0, False, False), "pdl": (1, False, True),
                               "pdl-prefetch": (1, True, True)}[variant]
        extra = {"launch_pdl": True} if pdl else {}
        for layer in range(self.layers):
            N, K = self.layer_shape(layer)
            _layer_kernel[(N // self.meta["BLOCK_N"],)](
                self.act[layer], self.weight(layer), self.act[layer + 1], self.batch, N, K,
                self.act.stride(1), self.act.stride(1), WAIT=wait, PREFETCH=prefetch, **self.meta, **extra)

    def reference(self) -> torch.Tensor:
        """float64 chain, rounded to the weights' dtype between layers as the kernels store them."""
        x = self.act[0, :self.batch, :self.D].double()
        for layer in range(self.layers):
            x = (x @ self.weight(layer).double().t()).to(self.w.dtype).double()
        return x


def replay_ms(graphs: dict, rounds: int) -> dict[str, list[float]]:
    """Milliseconds of one replay of each CUDA graph per round (after an untimed replay, CUDA events), the
    graphs alternated, their order reversed every other round."""
    names = list(graphs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            graphs[name].replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graphs[name].replay()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    return times


def main(argv=None) -> None:
    from cqil_kernels.bench import _commit, _warm_up_gpu, copy_bandwidth_gbps, write_record

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs=2, default=[4096, 11008], metavar=("D", "F"))
    ap.add_argument("--layers", type=int, action="append", help="chain lengths (default 2 and 8)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--programs-per-sm", type=int, default=2)
    ap.add_argument("--block-n", type=int, default=32)
    ap.add_argument("--block-k", type=int, default=256)
    ap.add_argument("--replays", type=int, default=20, help="graph replays per timing")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("persistent_chain measures GPU time and needs a CUDA device")
    device, commit = torch.device("cuda"), _commit()
    _warm_up_gpu(device, 1.0)
    copy = copy_bandwidth_gbps(device)
    rows, times_all = [], {}
    for layers in a.layers or [2, 8]:
        chain = Chain(tuple(a.dims), layers, a.batch, torch.bfloat16, device, block_n=a.block_n,
                      block_k=a.block_k, programs_per_sm=a.programs_per_sm)
        outs = {}
        for v in VARIANTS:  # compile, check, then capture
            chain.act[1:].zero_()
            chain.run(v)
            torch.cuda.synchronize()
            outs[v] = chain.output().clone()
        ref = chain.reference()
        for v in VARIANTS:
            if not torch.equal(outs[v], outs["launch"]):
                raise SystemExit(f"{v} differs from launch at {layers} layers: max "
                                 f"{(outs[v].float() - outs['launch'].float()).abs().max().item()}")
        err = (outs["launch"].double() - ref).abs().max().item() / ref.abs().max().item()
        graphs = {}
        for v in VARIANTS:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(a.replays):
                    chain.run(v)
            graphs[v] = g
        times = {v: [1000 * ms / a.replays for ms in t] for v, t in replay_ms(graphs, a.rounds).items()}
        if not torch.equal(chain.output(), outs["launch"]):
            raise SystemExit("the replayed graphs left a different result")
        nbytes = chain.weight_bytes()
        floor_us = nbytes / copy / 1e3
        for v in VARIANTS:
            us = statistics.median(times[v])
            rows.append([v, layers, round(us, 2), round(us / layers, 2), round(100 * floor_us / us, 1),
                         round((us - floor_us) / layers, 2)])
            print(f"{layers:>3} layers {v:>13}: {us:9.2f} us, {us / layers:7.2f} us/layer, "
                  f"{100 * floor_us / us:5.1f}% of copy, {(us - floor_us) / layers:6.2f} us/layer over it",
                  flush=True)
        times_all[str(layers)] = times
        print(f"    max error against float64 (relative to max |out|): {err:.2e}", flush=True)
    write_record(
        a.out, device=device, commit=commit,
        title="Persistent chain prototype: one launch with per-layer counters against a launch per layer",
        what=(f"chain of GEMVs alternating {a.dims[0]} -> {a.dims[1]} -> {a.dims[0]}, bf16, batch {a.batch}, "
              f"BLOCK_N {a.block_n}, BLOCK_K {a.block_k}, {a.programs_per_sm} persistent programs per SM; "
              f"{a.replays} chains per CUDA graph replay, events, medians of {a.rounds} rounds"),
        copy_gbps=round(copy, 1),
        columns=["variant", "layers", "us per chain", "us per layer", "% of copy", "us per layer over copy"],
        rows=rows, times_us=times_all)


if __name__ == "__main__":
    main()
