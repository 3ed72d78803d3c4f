"""The tensor-core ring chain of benchmarks/ring_batch.py (issue 26): on the CPU, the weight packing against
the mma.m16n8k16 fragment layouts, the page plan and the ring protocol (simulated: no order of progress
deadlocks); on an sm_90 GPU, every layer of the one-launch chain at batch 1 to 32 against its fp32 twin and
float64, the same bits for every ring, grid and batch size, eagerly and replayed from a CUDA graph."""

import pytest
import torch

from conftest import assert_kernel_close, import_benchmark


@pytest.fixture(scope="module")
def rb():
    return import_benchmark("ring_batch")


def test_pack_matches_the_fragment_layout(rb):
    """pack's order fed through the PTX fragment definitions (fragment_product) is x @ W^T, for odd batches and a
    tile count that is no power of two."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 80, generator=g, dtype=torch.float64)
    for batch in (1, 5, 8, 13, 32):
        x = torch.randn(batch, 80, generator=g, dtype=torch.float64)
        out = rb.fragment_product(rb.pack(w), x)
        assert out.shape == (batch, 48)
        torch.testing.assert_close(out, x @ w.t(), rtol=1e-12, atol=1e-12)
    assert rb.pack(w).shape == (3, 5, 32, 8)
    with pytest.raises(ValueError, match="multiples of 16"):
        rb.pack(torch.zeros(40, 24))


def _simulate(blocks, shapes, slots: int) -> list[int]:
    """The ring protocol of ring_batch.cu, every agent stepped whenever it can: a block's producer fills page i
    once page i - slots is consumed; a consumer warp walks its work list, on a task's first page publishing its
    count of the layer it leaves, then waiting for the layer before to be complete, then for its page. Returns
    the layers' counters; raises if no agent can move before all are done (a deadlock)."""
    tasks_of = [N // 16 for N, _ in shapes]
    counters = [0] * len(shapes)
    state = []
    for pages, work in blocks:
        state.append(dict(issued=0, consumed=[False] * len(pages), pages=pages,
                          warps=[dict(at=0, done=0, done_layer=0, work=w) for w in work]))
    moved = True
    while moved:
        moved = False
        for blk in state:
            i = blk["issued"]
            if i < len(blk["pages"]) and (i < slots or blk["consumed"][i - slots]):
                blk["issued"] += 1
                moved = True
            for wp in blk["warps"]:
                if wp["at"] == len(wp["work"]):
                    if wp["done"]:
                        counters[wp["done_layer"]] += wp["done"]
                        wp["done"] = 0
                        moved = True
                    continue
                pos, layer, _, _, _, flags = wp["work"][wp["at"]]
                if flags & 1:
                    if wp["done"] and layer != wp["done_layer"]:
                        counters[wp["done_layer"]] += wp["done"]
                        wp["done"] = 0
                        moved = True
                    if layer and counters[layer - 1] < tasks_of[layer - 1]:
                        continue
                if pos >= blk["issued"]:
                    continue
                blk["consumed"][pos] = True
                if flags & 2:
                    wp["done"] += 1
                    wp["done_layer"] = layer
                wp["at"] += 1
                moved = True
    if counters != tasks_of:
        raise RuntimeError(f"deadlock: counters {counters} of {tasks_of}")
    return counters


def test_plan(rb):
    """Every task's pages cover its K once, in order, first and last flagged; each block's page positions are
    0..n-1, every warp's in increasing order, layers never decreasing along a block's list; the tasks of block b
    are b, b + grid, ...; and the protocol finishes for every ring depth down to one slot."""
    shapes = [(48, 80), (1040, 48), (32, 1040), (4112, 32)]
    for grid, consumers, tiles in ((1, 1, 3), (3, 2, 5), (17, 4, 2), (5, 8, 70)):
        blocks = rb.plan(shapes, tiles, grid, consumers)
        seen = {}
        for b, (pages, work) in enumerate(blocks):
            assert [lay for lay, *_ in pages] == sorted(lay for lay, *_ in pages)
            positions = sorted(e[0] for w in work for e in w)
            assert positions == list(range(len(pages)))
            for w in work:
                assert [e[0] for e in w] == sorted(e[0] for e in w)
                for pos, layer, m, k0, t, flags in w:
                    assert pages[pos] == (layer, m, k0, t)
                    seen.setdefault((layer, m), []).append((k0, t, flags, b))
        tasks = [(layer, m) for layer, (N, _) in enumerate(shapes) for m in range(N // 16)]
        assert sorted(seen) == sorted(tasks)
        for index, (layer, m) in enumerate(tasks):
            mine = seen[(layer, m)]
            assert {b for *_, b in mine} == {index % grid}
            covered = [k for k0, t, _, _ in mine for k in range(k0, k0 + t)]
            assert covered == list(range(shapes[layer][1] // 16))
            flags = [f for _, _, f, _ in mine]
            assert flags[0] & 1 and flags[-1] & 2 and not any(f & 1 for f in flags[1:])
            assert not any(f & 2 for f in flags[:-1])
        for slots in (1, 2, 3, 8):
            assert _simulate(blocks, shapes, slots) == [N // 16 for N, _ in shapes]


def test_simulation_sees_a_deadlock(rb):
    """The simulator is not blind: a round mixing two layers (a layer-1 task's page interleaved before a
    layer-0 task's later pages, which ring_batch.plan never makes) deadlocks a two-slot ring."""
    shapes = [(16, 64), (16, 16)]
    pages = [(0, 0, 0, 1), (1, 0, 0, 1), (0, 0, 1, 1), (0, 0, 2, 1), (0, 0, 3, 1)]
    work = [[(0, 0, 0, 0, 1, 1), (2, 0, 0, 1, 1, 0), (3, 0, 0, 2, 1, 0), (4, 0, 0, 3, 1, 2)],
            [(1, 1, 0, 0, 1, 3)]]
    assert _simulate([(pages, work)], shapes, 8) == [1, 1]
    with pytest.raises(RuntimeError, match="deadlock"):
        _simulate([(pages, work)], shapes, 2)


def test_ring_batch_rejects_bad_input(rb):
    """Shapes, strides, dtypes and ring settings the kernel cannot take are named before anything launches."""
    w = [torch.zeros(32, 48, dtype=torch.bfloat16), torch.zeros(16, 32, dtype=torch.bfloat16)]
    acts = [torch.zeros(3, n, dtype=torch.bfloat16) for n in (48, 32, 16)]
    with pytest.raises(ValueError, match="need 3 activations"):
        rb.RingBatch(w, acts[:2])
    with pytest.raises(ValueError, match="batch 1..32"):
        rb.RingBatch(w, [torch.zeros(33, n, dtype=torch.bfloat16) for n in (48, 32, 16)])
    with pytest.raises(ValueError, match="multiples of 16"):
        rb.RingBatch([torch.zeros(24, 48, dtype=torch.bfloat16)], acts[:1] + [torch.zeros(3, 24)])
    with pytest.raises(ValueError, match=r"acts\[1\]: bf16"):
        rb.RingBatch(w, [acts[0], acts[1].float(), acts[2]])
    with pytest.raises(ValueError, match=r"acts\[2\] must be \[3, 16\]"):
        rb.RingBatch(w, acts[:2] + [torch.zeros(3, 32, dtype=torch.bfloat16)])
    with pytest.raises(ValueError, match="row stride that is a multiple of 4"):
        rb.RingBatch(w, [torch.zeros(3, 50, dtype=torch.bfloat16)[:, :48]] + acts[1:])
    with pytest.raises(ValueError, match="takes K=48"):
        rb.RingBatch([w[0], torch.zeros(16, 48, dtype=torch.bfloat16)], acts)
    with pytest.raises(ValueError, match="consumers must be"):
        rb.RingBatch(w, acts, consumers=9)
    with pytest.raises(ValueError, match="hold no 512-byte"):
        rb.RingBatch(w, acts, slots=8, ring_kb=3)
    with pytest.raises(ValueError, match="mode must be one of"):
        rb.RingBatch(w, acts, mode="fast")
    with pytest.raises(ValueError, match="one block per SM"):
        rb.RingBatch(w, acts, grid=2)  # the CPU counts as one SM


@pytest.mark.cuda
@pytest.mark.skipif(not import_benchmark("ring_chain").available(), reason="needs an sm_90 GPU and nvcc")
def test_ring_batch_cuda(rb):
    """Odd shapes (layers with fewer tasks than SMs, K of 2 to 257 k-tiles), batches 1, 3, 8, 13 and 32 (one to
    four n-tiles, partial ones), rings of 1 to 8 slots and 1 to 8 consumers, grids 1, 3, 17 and every SM: each
    layer's output from the input the kernel stored against its fp32 twin and float64 (within ring_bound
    elementwise); the same bits for every ring and grid, for a batch row whatever the batch, and after a graph
    replay (a row's two sums, even and odd k-tiles of K, each go in order however K is paged)."""
    ring_chain = import_benchmark("ring_chain")
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    dims = [32, 1040, 48, 4112, 16, 272]
    weights = [(torch.randn(n, k, generator=g) / k ** 0.5).to(torch.bfloat16).to(device)
               for k, n in zip(dims[:-1], dims[1:])]
    packed = [rb.pack(w) for w in weights]
    x0 = torch.randn(32, dims[0], generator=g).to(torch.bfloat16).to(device)
    reference = None
    for batch in (32, 1, 3, 8, 13):
        buf = torch.empty(len(dims), batch, max(dims) + 4, dtype=torch.bfloat16, device=device)  # row stride
        acts = [buf[i, :, :d] for i, d in enumerate(dims)]
        acts[0].copy_(x0[:batch])
        first = None
        for slots, consumers, ring_kb, grid in ((8, 4, 40, None), (1, 1, 8, None), (2, 2, 16, 3), (4, 8, 24, 17),
                                                (3, 2, 9, 1)):
            buf[1:].fill_(float("nan"))
            chain = rb.RingBatch(weights, acts, slots=slots, consumers=consumers, ring_kb=ring_kb, grid=grid,
                                 packed=packed)
            chain.run()
            torch.cuda.synchronize()
            assert chain.counters.tolist() == [n // 16 for n in dims[1:]]
            for layer, w in enumerate(weights):
                x = acts[layer]
                assert_kernel_close(acts[layer + 1].cpu(), (x.float() @ w.float().t()).to(torch.bfloat16).cpu(),
                                    x.double().cpu() @ w.double().cpu().t(), terms=w.shape[1])
            assert ring_chain.check_layers(chain) <= 1
            if first is None:
                first = [a.clone() for a in acts[1:]]
            for a, b in zip(acts[1:], first):
                assert torch.equal(a, b), (batch, slots, consumers, grid)
        if reference is None:
            reference = first
        for a, b in zip(first, reference):  # batch row n's bits do not depend on the other rows
            assert torch.equal(a, b[:batch]), batch
    profiled = rb.RingBatch(weights, acts, slots=4, consumers=2, ring_kb=24, grid=17, packed=packed, profile=True)
    buf[1:].fill_(float("nan"))
    profiled.run()
    torch.cuda.synchronize()
    for a, b in zip(acts[1:], first):  # the stamps change no result
        assert torch.equal(a, b)
    issued, taken, x, data, stored = profiled.prof.cpu().unbind(1)
    assert (issued > 0).all() and (taken <= x).all() and (x <= data).all() and (data <= stored).all()
    assert (issued <= data).all()  # a slot's bytes arrive after their copy was issued
    assert (x == taken)[~profiled.waits_x].all()  # only a task's first page waits for the layer before
    assert len(ring_chain.profile_summary(profiled)) == len(weights)
    for mode in ("stream", "compute"):  # the diagnostics keep the protocol: every task counted, no hang
        diag = rb.RingBatch(weights, acts, slots=4, consumers=2, ring_kb=24, mode=mode, packed=packed)
        diag.run()
        torch.cuda.synchronize()
        assert diag.counters.tolist() == [n // 16 for n in dims[1:]]
    buf[1:].fill_(float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain.run()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(acts[1:], first):
        assert torch.equal(a, b)
