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


def _passes(phase: int, parity: int) -> bool:
    """mbarrier.try_wait.parity: true once the phase of that parity has completed, i.e. while the barrier's
    current phase (completed phases counted) has the other parity; it cannot tell phase k from k +/- 2."""
    return phase % 2 != parity


def _simulate(blocks, shapes, slots: int, consumers: int, consumer_slot=None, lazy: bool = False) -> list[int]:
    """The ring protocol of ring_batch.cu, the barriers modelled as the hardware's: a phase count per slot for
    `full` (copies landed) and `empty` (pages consumed), waits on a parity. A block's producer copies page i into
    its (slot, use) once the slot's `empty` passes for use - 1; a consumer warp walks its work list, on a task's
    first page publishing its count of the layer it leaves and waiting for the layer before to be complete,
    then waits on its slot's `full` for its use (consumer_slot(warp, e, position) -> (slot, use): default the
    kernel's, warp w's e-th page in slot w * per + e % per). Every agent that can move does, producers first;
    lazy: producers move only when no consumer can (the consumers racing ahead). Returns the layers' counters;
    raises where a wait passes on a phase two away from the one meant (a page read before its copy, or a slot
    refilled before its page was read) and where no agent can move before all are done."""
    per = slots // consumers
    consumer_slot = consumer_slot or (lambda w, e, pos: (w * per + e % per, e // per))
    tasks_of = [N // 16 for N, _ in shapes]
    counters = [0] * len(shapes)
    state = [dict(issued=0, pages=pages, full=[0] * slots, empty=[0] * slots, holds=[None] * slots,
                  warps=[dict(at=0, done=0, done_layer=0, work=w) for w in work]) for pages, work in blocks]

    def produce(blk) -> bool:
        i = blk["issued"]
        if i == len(blk["pages"]):
            return False
        *_, slot, use = blk["pages"][i]
        if use and not _passes(blk["empty"][slot], (use - 1) % 2):
            return False
        if blk["empty"][slot] != use:
            raise RuntimeError(f"page {i} refilled slot {slot} before its page was read")
        blk["holds"][slot] = i
        blk["full"][slot] += 1
        blk["issued"] += 1
        return True

    def consume(blk, w, wp) -> bool:
        if wp["at"] == len(wp["work"]):
            if not wp["done"]:
                return False
            counters[wp["done_layer"]] += wp["done"]
            wp["done"] = 0
            return True
        pos, layer, _, _, _, flags = wp["work"][wp["at"]]
        moved = False
        if flags & 1:
            if wp["done"] and layer != wp["done_layer"]:
                counters[wp["done_layer"]] += wp["done"]
                wp["done"] = 0
                moved = True
            if layer and counters[layer - 1] < tasks_of[layer - 1]:
                return moved
        slot, use = consumer_slot(w, wp["at"], pos)
        if not _passes(blk["full"][slot], use % 2):
            return moved
        if blk["holds"][slot] != pos:
            raise RuntimeError(f"warp {w} read page {pos} from slot {slot}, which holds page {blk['holds'][slot]}")
        blk["empty"][slot] += 1
        if flags & 2:
            wp["done"] += 1
            wp["done_layer"] = layer
        wp["at"] += 1
        return True

    while True:
        moved = False
        if not lazy:
            moved = any([produce(blk) for blk in state])
        moved = any([consume(blk, w, wp) for blk in state for w, wp in enumerate(blk["warps"])]) or moved
        if lazy and not moved:
            moved = any([produce(blk) for blk in state])
        if not moved:
            break
    if counters != tasks_of:
        raise RuntimeError(f"deadlock: counters {counters} of {tasks_of}")
    return counters


def test_plan(rb):
    """Every task's pages cover its K once, in order, first and last flagged; each block's page positions are
    0..n-1, every warp's in increasing order, layers never decreasing along a block's list; a page's slot is its
    warp's own; the tasks of block b are b, b + grid, ...; and the protocol finishes, every wait meaning the
    page it names, for every ring depth down to one slot a warp."""
    shapes = [(48, 80), (1040, 48), (32, 1040), (4112, 32)]
    for grid, consumers, tiles in ((1, 1, 3), (3, 2, 5), (17, 4, 2), (5, 8, 70)):
        blocks = rb.plan(shapes, tiles, grid, consumers, 2 * consumers)
        seen = {}
        for b, (pages, work) in enumerate(blocks):
            assert [lay for lay, *_ in pages] == sorted(lay for lay, *_ in pages)
            positions = sorted(e[0] for w in work for e in w)
            assert positions == list(range(len(pages)))
            for w, mine in enumerate(work):
                assert [e[0] for e in mine] == sorted(e[0] for e in mine)
                for e, (pos, layer, m, k0, t, flags) in enumerate(mine):
                    assert pages[pos] == (layer, m, k0, t, 2 * w + e % 2, e // 2)
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
        for per in (1, 2, 3):
            blocks = rb.plan(shapes, tiles, grid, consumers, per * consumers)
            for lazy in (False, True):
                assert _simulate(blocks, shapes, per * consumers, consumers, lazy=lazy) == [N // 16 for N, _ in shapes]
    with pytest.raises(ValueError, match="consumers must divide slots"):
        rb.plan(shapes, 3, 1, 4, 6)


def test_simulation_is_not_blind():
    """The simulator sees both failures it is there for. A parity wait cannot tell phase k from k - 2: with one
    ring shared by the warps (page i in slot i % slots, as the first version of ring_batch.cu had it) a warp whose
    next page is more than `slots` positions on can pass its wait before that page is copied, while the
    producer lags (here, a hand-made list; plan's rounds never space a warp's pages so without a layer wait in
    between). And a round mixing two layers (a layer-1 task's page before a layer-0 task's later pages, which
    plan never makes) deadlocks."""
    shapes = [(32, 32)]
    pages = [(0, 0, 0, 1, 0, 0), (0, 1, 0, 1, 1, 0), (0, 1, 1, 1, 0, 1), (0, 0, 1, 1, 1, 1)]
    work = [[(0, 0, 0, 0, 1, 1), (3, 0, 0, 1, 1, 2)], [(1, 0, 1, 0, 1, 1), (2, 0, 1, 1, 1, 2)]]
    shared = dict(consumer_slot=lambda w, e, pos: (pos % 2, pos // 2))  # the pages' slots and uses are these too
    assert _simulate([(pages, work)], shapes, 2, 2, **shared) == [2]  # the producer keeping up: no harm
    with pytest.raises(RuntimeError, match="read page 3 from slot 1, which holds page None"):
        _simulate([(pages, work)], shapes, 2, 2, lazy=True, **shared)
    shapes = [(16, 64), (16, 16)]
    work = [[(0, 0, 0, 0, 1, 1), (2, 0, 0, 1, 1, 0), (3, 0, 0, 2, 1, 0), (4, 0, 0, 3, 1, 2)],
            [(1, 1, 0, 0, 1, 3)]]
    pages = [(0, 0, 0, 1, 0, 0), (1, 0, 0, 1, 1, 0), (0, 0, 1, 1, 0, 1), (0, 0, 2, 1, 1, 1), (0, 0, 3, 1, 0, 2)]
    in_order = [[(0, 0, 0, 0, 1, 1), (1, 0, 0, 1, 1, 0), (2, 0, 0, 2, 1, 0), (3, 0, 0, 3, 1, 2)],
                [(4, 1, 0, 0, 1, 3)]]  # plan's order: the layer-1 page after the layer-0 ones
    assert _simulate([([(0, 0, k, 1, k % 2, k // 2) for k in range(4)] + [(1, 0, 0, 1, 0, 2)], in_order)],
                     shapes, 2, 2, **shared) == [1, 1]
    with pytest.raises(RuntimeError, match="deadlock"):
        _simulate([(pages, work)], shapes, 2, 2, **shared)


def test_check_names_the_wait_that_gave_up(rb):
    """The watchdog's report (ring_batch.cu's diag) read back as an error naming the wait; cleared once read."""

    class Ran:
        diag = torch.tensor([2, 7, 3, 41, 2, 250, 257, 96])

    with pytest.raises(RuntimeError, match=r"layer before: block 7, warp 3, page 41 .*layer 1's counter at 250 of "
                                           r"257; the list holding 96"):
        rb.check(Ran)
    rb.check(Ran)  # cleared
    Ran.diag = torch.tensor([3, 0, 1, 5, 6, 2, 0, 12])
    with pytest.raises(RuntimeError, match=r"its page's copy: block 0, warp 1, page 5 .*slot 6, use 2, parity 0"):
        rb.check(Ran)


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
    with pytest.raises(ValueError, match="divide slots=6"):
        rb.RingBatch(w, acts, slots=6, consumers=4)
    with pytest.raises(ValueError, match="hold no 512-byte"):
        rb.RingBatch(w, acts, slots=8, ring_kb=3)
    with pytest.raises(ValueError, match="mode must be one of"):
        rb.RingBatch(w, acts, mode="fast")
    with pytest.raises(ValueError, match="one block per SM"):
        rb.RingBatch(w, acts, grid=2)  # the CPU counts as one SM


@pytest.mark.cuda
@pytest.mark.skipif(not import_benchmark("ring_chain").available(), reason="needs an sm_90 GPU and nvcc")
@pytest.mark.parametrize("dims,batch,slots,consumers,grid", [
    ((32, 16), 1, 1, 1, 1),              # one task, one page, one block
    ((64, 48, 32), 1, 2, 1, 1),          # a layer boundary in one block, pages reused
    ((64, 48, 32), 8, 2, 2, 2),          # two consumers, two blocks, a full n-tile
    ((32, 1040, 48, 272), 32, 8, 4, 0),  # every SM, four n-tiles, rounds shorter than the consumers
], ids=["one-task", "two-layers", "two-warps", "every-sm"])
def test_ring_batch_cuda_smallest_first(rb, dims, batch, slots, consumers, grid):
    """The chain from its smallest form up, each against float64 (ring_bound) and checked by the watchdog: where
    test_ring_batch_cuda fails, which of these fail says how much of the protocol it takes."""
    ring_chain = import_benchmark("ring_chain")
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(1)
    weights = [(torch.randn(n, k, generator=g) / k ** 0.5).to(torch.bfloat16).to(device)
               for k, n in zip(dims[:-1], dims[1:])]
    acts = [torch.randn(batch, dims[0], generator=g).to(torch.bfloat16).to(device)]
    acts += [torch.full((batch, d), float("nan"), dtype=torch.bfloat16, device=device) for d in dims[1:]]
    chain = rb.RingBatch(weights, acts, slots=slots, consumers=consumers, ring_kb=2 * slots, grid=grid or None)
    chain.run()
    rb.check(chain)
    assert chain.counters.tolist() == [d // 16 for d in dims[1:]]
    assert ring_chain.check_layers(chain) <= 1


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
        for slots, consumers, ring_kb, grid in ((8, 4, 40, None), (1, 1, 8, None), (2, 2, 16, 3), (8, 8, 24, 17),
                                                (6, 2, 9, 1)):
            buf[1:].fill_(float("nan"))
            chain = rb.RingBatch(weights, acts, slots=slots, consumers=consumers, ring_kb=ring_kb, grid=grid,
                                 packed=packed)
            chain.run()
            rb.check(chain)  # no wait gave up (the watchdog would name it)
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
    rb.check(profiled)
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
        rb.check(diag)
        assert diag.counters.tolist() == [n // 16 for n in dims[1:]]
    buf[1:].fill_(float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain.run()
    graph.replay()
    rb.check(chain)
    for a, b in zip(acts[1:], first):
        assert torch.equal(a, b)
