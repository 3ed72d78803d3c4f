"""The tensor-core ring chain of benchmarks/ring_batch.py (issue 26): on the CPU, the weight packing against
the mma.m16n8k16 fragment layouts, the kernel's fp32 twin, the task plan and the ring protocol (simulated: no
order of progress deadlocks or makes a wait pass on the wrong page); on an sm_90 GPU, every layer of the
one-launch chain at batch 1 to 32 against its fp32 twin and float64, the same bits for every ring, grid, task
size and batch size, eagerly and replayed from a CUDA graph."""

import pytest
import torch

from conftest import assert_kernel_close, import_benchmark


@pytest.fixture(scope="module")
def rb():
    return import_benchmark("ring_batch")


def test_pack_matches_the_fragment_layout(rb):
    """pack's order fed through the PTX fragment definitions (fragment_product) is x @ W^T, for odd batches, a
    tile count that is no power of two and tasks of one, two and four m-tiles; unpack inverts it."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 80, generator=g, dtype=torch.float64)
    for m_tiles in (1, 2, 4):
        packed = rb.pack(w, m_tiles)
        assert packed.shape == (4 // m_tiles, 5, m_tiles, 32, 8)
        assert torch.equal(rb.unpack(packed), w)
        for batch in (1, 5, 8, 13, 32):
            x = torch.randn(batch, 80, generator=g, dtype=torch.float64)
            out = rb.fragment_product(packed, x)
            assert out.shape == (batch, 64)
            torch.testing.assert_close(out, x @ w.t(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="multiple of 16 and K of 16"):
        rb.pack(torch.zeros(40, 32))
    with pytest.raises(ValueError, match="multiple of 32 and K of 16"):
        rb.pack(torch.zeros(48, 32), 2)


def test_class_sums(rb):
    """The fp32 twin (four k-tile classes summed apart, then (s0 + s2) + (s1 + s3)) is within ring_bound of
    float64 and its bits do not depend on the task size or on the other batch rows."""
    ring_chain = import_benchmark("ring_chain")
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(64, 1040, generator=g) / 1040 ** 0.5).to(torch.bfloat16)
    x = torch.randn(13, 1040, generator=g).to(torch.bfloat16)
    out = rb.class_sums(rb.pack(w, 1), x)
    ref, bound = ring_chain.ring_bound(w, x)
    assert ((out.double() - ref).abs() <= bound).all()
    assert torch.equal(out, rb.class_sums(rb.pack(w, 2), x))
    assert torch.equal(out[:5], rb.class_sums(rb.pack(w, 1), x[:5]))


def _passes(phase: int, parity: int) -> bool:
    """mbarrier.try_wait.parity: true once the phase of that parity has completed, i.e. while the barrier's
    current phase (completed phases counted) has the other parity; it cannot tell phase k from k +/- 2."""
    return phase % 2 != parity


def _consumer_ops(tasks, shapes, m_tiles: int, tiles_per_page: int, rb):
    """What every consumer warp of a block does, in order (ring_batch.cu's consumer loop): ("barrier",),
    ("publish", layer, tasks) (warp 0, after a barrier), ("wait", layer, tasks) (the layer's counter),
    ("page", i) (wait for page i's copy, read it, arrive on its slot's `empty`)."""
    ops, done, done_layer, ready, i = [], 0, 0, 0, 0
    for layer, _ in tasks:
        if done and layer != done_layer:
            ops += [("barrier",), ("publish", done_layer, done)]
            done = 0
        if layer and ready < layer:
            ops.append(("wait", layer - 1, shapes[layer - 1][0] // (16 * m_tiles)))
            ready = layer
        for _ in rb.pages_of(shapes[layer][1] // 16, tiles_per_page):
            ops.append(("page", i))
            i += 1
        ops.append(("barrier",))  # the class sums exchanged, then stored
        done_layer, done = layer, done + 1
    if done:
        ops += [("barrier",), ("publish", done_layer, done)]
    return ops, i


def _simulate(rb, shapes, m_tiles: int, tiles_per_page: int, grid: int, slots: int, consumers: int,
              lazy: bool = False, empty_count: int | None = None, blocks=None, slow=(),
              barrier_count: int | None = None) -> list[int]:
    """The ring protocol of ring_batch.cu, the barriers modelled as the hardware's: per slot a phase count for
    `full` (a page copied) and an arrival count for `empty` (a phase every `empty_count`, default `consumers`,
    arrivals: every warp read the page), waits on a parity. A block's producer copies page i into slot i %
    slots once `empty` passes for the slot's use - 1; its consumer warps each walk _consumer_ops, the
    consumers' barrier an mbarrier too (a phase every `barrier_count`, default `consumers`, arrivals; a warp's
    k-th barrier waits on parity k % 2). One arrival here stands for a warp's 32 lanes' (the kernel counts
    32 per warp). Every agent that can move does, producers first; lazy: producers move only when no consumer
    can (the consumers racing ahead). Returns the layers' counters; raises where a wait passes on a phase two
    away from the one meant (a page read before its copy, a slot refilled before every warp read its page, a
    consumers' barrier passed on another generation's phase) and where no agent can move before all are
    done. blocks: the blocks' task lists (default plan's); slow: consumer warps that move only when nothing
    else can."""
    empty_count = empty_count or consumers
    barrier_count = barrier_count or consumers
    blocks = blocks if blocks is not None else rb.plan(shapes, m_tiles, grid)
    counters = [0] * len(shapes)
    state = []
    for tasks in blocks:
        ops, n_pages = _consumer_ops(tasks, shapes, m_tiles, tiles_per_page, rb)
        state.append(dict(issued=0, pages=n_pages, ops=ops, full=[0] * slots, arrivals=[0] * slots,
                          holds=[None] * slots, reads=[0] * slots, barrier=0,
                          warps=[dict(at=0, arrived=False, passed=0) for _ in range(consumers)]))

    def produce(blk) -> bool:
        i = blk["issued"]
        if i == blk["pages"]:
            return False
        slot, use = i % slots, i // slots
        if use and not _passes(blk["arrivals"][slot] // empty_count, (use - 1) % 2):
            return False
        if blk["holds"][slot] is not None and blk["reads"][slot] != consumers:
            raise RuntimeError(f"page {i} refilled slot {slot} before every warp read page {blk['holds'][slot]}")
        blk["holds"][slot], blk["reads"][slot] = i, 0
        blk["full"][slot] += 1
        blk["issued"] += 1
        return True

    def consume(blk, w, wp) -> bool:
        if wp["at"] == len(blk["ops"]):
            return False
        op = blk["ops"][wp["at"]]
        if op[0] == "barrier":  # the kernel's consumers_sync: arrive, then wait on this generation's parity
            if not wp["arrived"]:
                blk["barrier"] += 1
                wp["arrived"] = True
                return True
            phases = blk["barrier"] // barrier_count
            if not _passes(phases, wp["passed"] % 2):
                return False
            if phases != wp["passed"] + 1:
                raise RuntimeError(f"warp {w} passed the consumers' barrier {wp['passed']} on phase {phases}")
            wp["passed"] += 1
            wp["arrived"] = False
        elif op[0] == "publish":
            if w == 0:
                counters[op[1]] += op[2]
        elif op[0] == "wait":
            if counters[op[1]] < op[2]:
                return False
        else:
            i = op[1]
            slot = i % slots
            if not _passes(blk["full"][slot], (i // slots) % 2):
                return False
            if blk["holds"][slot] != i:
                raise RuntimeError(f"warp {w} read page {i} from slot {slot}, which holds page {blk['holds'][slot]}")
            blk["reads"][slot] += 1
            blk["arrivals"][slot] += 1
        wp["at"] += 1
        return True

    while True:
        moved = False
        if not lazy:
            moved = any([produce(blk) for blk in state])
        moved = any([consume(blk, w, wp) for blk in state for w, wp in enumerate(blk["warps"])
                     if w not in slow]) or moved
        if not moved:
            moved = any([consume(blk, w, wp) for blk in state for w, wp in enumerate(blk["warps"]) if w in slow])
        if lazy and not moved:
            moved = any([produce(blk) for blk in state])
        if not moved:
            break
    want = [N // (16 * m_tiles) for N, _ in shapes]
    if counters != want:
        raise RuntimeError(f"deadlock: counters {counters} of {want}")
    return counters


def test_plan_and_protocol(rb):
    """Block b's tasks are b, b + grid, ... in chain order, every task once; pages_of covers K once in order;
    and the protocol finishes, every wait meaning the page it names, for every ring depth down to one slot,
    one to four consumers, tasks of one and two m-tiles, the producer keeping up or lagging, a warp lagging."""
    shapes = [(64, 80), (160, 64), (32, 160), (288, 32)]
    for k_tiles, per in ((5, 4), (66, 8), (8, 4)):
        covered = [k for k0, t in rb.pages_of(k_tiles, per) for k in range(k0, k0 + t)]
        assert covered == list(range(k_tiles))
        assert all(k0 % 4 == 0 for k0, _ in rb.pages_of(k_tiles, per))
    for m_tiles in (1, 2):
        tasks = [(layer, t) for layer, (N, _) in enumerate(shapes) for t in range(N // (16 * m_tiles))]
        for grid in (1, 3, 17):
            blocks = rb.plan(shapes, m_tiles, grid)
            assert sorted(t for b in blocks for t in b) == sorted(tasks)
            for b, mine in enumerate(blocks):
                assert mine == tasks[b::grid]
            for slots, consumers, tiles_per_page in ((1, 1, 4), (2, 2, 4), (3, 4, 8), (8, 4, 4)):
                for lazy, slow in ((False, ()), (True, ()), (False, {consumers - 1})):
                    assert _simulate(rb, shapes, m_tiles, tiles_per_page, grid, slots, consumers, lazy=lazy,
                                     slow=slow) == [N // (16 * m_tiles) for N, _ in shapes]


def test_simulation_is_not_blind(rb):
    """The simulator sees the failures it is there for: a slot's `empty` completing a phase on one warp's read
    instead of every warp's (as if initialized with count 1) lets the producer refill it under a slower warp; a
    block whose tasks are not in chain order (a layer-1 task before a layer-0 one, which plan never makes)
    deadlocks; and so does a consumers' barrier whose phase completes on one warp's arrival."""
    shapes = [(32, 128), (16, 32)]
    with pytest.raises(RuntimeError, match="refilled slot 0 before every warp read page 0"):
        _simulate(rb, shapes, 1, 4, 1, 1, 2, empty_count=1, slow={1})
    for slow in ((), {0}, {1}):
        assert _simulate(rb, shapes, 1, 4, 1, 1, 2, slow=slow) == [2, 1]
    with pytest.raises(RuntimeError, match="deadlock"):
        _simulate(rb, shapes, 1, 4, 1, 2, 2, blocks=[[(1, 0), (0, 0), (0, 1)]])
    # the consumers' barrier completing a phase on each warp's arrival lets one warp through alone, after which
    # the other waits on a phase that has gone by: the block stops
    with pytest.raises(RuntimeError, match="deadlock|passed the consumers' barrier"):
        _simulate(rb, shapes, 1, 4, 1, 2, 2, barrier_count=1)


def test_check_names_the_wait_that_gave_up(rb):
    """The watchdog's report (ring_batch.cu's diag) read back as an error naming the wait; cleared once read."""

    class Ran:
        diag = torch.tensor([2, 7, 3, 41, 2, 250, 257, 96])
        patience = 2_000_000_000

    with pytest.raises(RuntimeError, match=r"layer before: block 7, warp 3, page 41 of the block's 96 .*layer 1's "
                                           r"counter at 250 of 257\) after 2 s"):
        rb.check(Ran)
    rb.check(Ran)  # cleared
    Ran.diag = torch.tensor([3, 0, 1, 5, 6, 2, 0, 12])
    with pytest.raises(RuntimeError, match=r"its page's copy: block 0, warp 1, page 5 .*slot 6, use 2, parity 0"):
        rb.check(Ran)


def test_patience_from_the_environment(rb, monkeypatch):
    """The watchdog's patience: 2 s, or CQIL_RING_PATIENCE_S (longer under compute-sanitizer); nonsense is named."""
    monkeypatch.delenv("CQIL_RING_PATIENCE_S", raising=False)
    assert rb.patience_ns() == 2_000_000_000
    monkeypatch.setenv("CQIL_RING_PATIENCE_S", "60")
    assert rb.patience_ns() == 60_000_000_000
    for bad in ("0", "-1", "soon", "nan", "1e9"):
        monkeypatch.setenv("CQIL_RING_PATIENCE_S", bad)
        with pytest.raises(ValueError, match="CQIL_RING_PATIENCE_S must be seconds"):
            rb.patience_ns()


def test_ring_batch_rejects_bad_input(rb):
    """Shapes, strides, dtypes and ring settings the kernel cannot take are named before anything launches."""
    w = [torch.zeros(32, 48, dtype=torch.bfloat16), torch.zeros(16, 32, dtype=torch.bfloat16)]
    acts = [torch.zeros(3, n, dtype=torch.bfloat16) for n in (48, 32, 16)]
    with pytest.raises(ValueError, match="need 3 activations"):
        rb.RingBatch(w, acts[:2])
    with pytest.raises(ValueError, match="batch 1..32"):
        rb.RingBatch(w, [torch.zeros(33, n, dtype=torch.bfloat16) for n in (48, 32, 16)])
    with pytest.raises(ValueError, match="multiple of 16 and K of 16"):
        rb.RingBatch([torch.zeros(24, 48, dtype=torch.bfloat16)], acts[:1] + [torch.zeros(3, 24)])
    with pytest.raises(ValueError, match="multiple of 32 and K of 16"):
        rb.RingBatch(w, acts, m_tiles=2)
    with pytest.raises(ValueError, match="m_tiles must be 1, 2 or 4"):
        rb.RingBatch(w, acts, m_tiles=3)
    w64 = [torch.zeros(64, 48, dtype=torch.bfloat16), torch.zeros(64, 64, dtype=torch.bfloat16)]
    with pytest.raises(ValueError, match="4 m-tiles need 2 or 4 consumers"):
        rb.RingBatch(w64, [torch.zeros(3, n, dtype=torch.bfloat16) for n in (48, 64, 64)], m_tiles=4, consumers=1)
    with pytest.raises(ValueError, match=r"acts\[1\]: bf16"):
        rb.RingBatch(w, [acts[0], acts[1].float(), acts[2]])
    with pytest.raises(ValueError, match=r"acts\[2\] must be \[3, 16\]"):
        rb.RingBatch(w, acts[:2] + [torch.zeros(3, 8, dtype=torch.bfloat16)])
    with pytest.raises(ValueError, match="unit column stride"):
        rb.RingBatch(w, [torch.zeros(48, 3, dtype=torch.bfloat16).t()] + acts[1:])
    strided = [torch.zeros(13, n + 4, dtype=torch.bfloat16)[:, :n] for n in (48, 32, 16)]  # rows 8-byte aligned
    rb.RingBatch(w, strided, x_buffers=False)  # B fragments from L2: 8 bytes
    with pytest.raises(ValueError, match="multiple of 8 and a 16-byte aligned start expected at batch 13"):
        rb.RingBatch(w, strided)  # staged x: 16-byte copies
    with pytest.raises(ValueError, match="takes K=32, but layer 0 makes 16"):
        rb.RingBatch([torch.zeros(16, 48, dtype=torch.bfloat16), torch.zeros(16, 32, dtype=torch.bfloat16)], acts)
    with pytest.raises(ValueError, match="consumers must be one of"):
        rb.RingBatch(w, acts, consumers=3)
    with pytest.raises(ValueError, match="hold no 4 k-tiles"):
        rb.RingBatch(w, acts, slots=8, ring_kb=15)
    with pytest.raises(ValueError, match="more than"):
        rb.RingBatch(w, acts, slots=8, ring_kb=226)
    with pytest.raises(ValueError, match="mode must be one of"):
        rb.RingBatch(w, acts, mode="fast")
    with pytest.raises(ValueError, match="one block per SM"):
        rb.RingBatch(w, acts, grid=2)  # the CPU counts as one SM
    with pytest.raises(ValueError, match="pack"):
        rb.RingBatch(w, acts, packed=[rb.pack(w[0]), rb.pack(w[0])])


def test_default_ring_fits(rb):
    """The default ring is the largest of whole 4-k-tile groups (up to RING_KB) that fits shared memory beside the
    sums and, from batch STAGED_BATCH on, the x buffers; an older kernel without x buffers gets more."""
    ring_chain = import_benchmark("ring_chain")
    for batch in (1, 8, 9, 16, 32):
        for m_tiles, consumers in ((1, 4), (2, 4), (2, 2), (4, 4)):
            for slots in (2, 3, 4, 8):
                n = 64 * m_tiles
                w = [torch.zeros(n, 1024, dtype=torch.bfloat16)]
                acts = [torch.zeros(batch, 1024, dtype=torch.bfloat16), torch.zeros(batch, n, dtype=torch.bfloat16)]
                for x_buffers in (True, False):
                    chain = rb.RingBatch(w, acts, slots=slots, consumers=consumers, m_tiles=m_tiles,
                                         x_buffers=x_buffers)
                    need = rb.smem_bytes(slots, chain.slot_bytes, batch, m_tiles, x_buffers)
                    group = 4 * rb.TILE_BYTES * m_tiles
                    more = rb.smem_bytes(slots, chain.slot_bytes + group, batch, m_tiles, x_buffers)
                    assert need <= ring_chain.SMEM_LIMIT
                    assert more > ring_chain.SMEM_LIMIT or slots * (chain.slot_bytes + group) > rb.RING_KB * 1024
                    if x_buffers and batch >= rb.STAGED_BATCH:
                        assert need - rb.smem_bytes(slots, chain.slot_bytes, batch, m_tiles, False) == \
                            2 * chain.tiles_per_page * 8 * -(-batch // 8) * 32


def _chain(dims, batch, device, seed):
    g = torch.Generator().manual_seed(seed)
    weights = [(torch.randn(n, k, generator=g) / k ** 0.5).to(torch.bfloat16).to(device)
               for k, n in zip(dims[:-1], dims[1:])]
    acts = [torch.randn(batch, dims[0], generator=g).to(torch.bfloat16).to(device)]
    acts += [torch.full((batch, d), float("nan"), dtype=torch.bfloat16, device=device) for d in dims[1:]]
    return weights, acts


def _check_layers(rb, chain) -> None:
    """Each layer's output from the input the kernel stored against the fp32 twin and float64; within
    ring_bound too (ring_chain.check_layers)."""
    ring_chain = import_benchmark("ring_chain")
    for layer, w in enumerate(chain.weights):
        x = chain.acts[layer].cpu()
        w = w.cpu()
        assert_kernel_close(chain.acts[layer + 1].cpu(), rb.class_sums(rb.pack(w), x),
                            x.double() @ w.double().t(), terms=w.shape[1])
    assert ring_chain.check_layers(chain) <= 1


@pytest.mark.cuda
@pytest.mark.skipif(not import_benchmark("ring_chain").available(), reason="needs an sm_90 GPU and nvcc")
@pytest.mark.parametrize("dims,batch,slots,consumers,ring_kb,grid,m_tiles", [
    ((32, 16), 1, 1, 1, 2, 1, 1),                  # one task, one page, one block
    ((64, 48, 32), 1, 2, 1, 4, 1, 1),              # a layer boundary in one block, slots reused
    ((64, 48, 32), 8, 2, 2, 4, 2, 1),              # two consumers, two blocks, a full n-tile
    ((32, 1040, 48, 272), 32, 8, 4, 16, 0, 1),     # four consumers, every SM, four n-tiles
    ((64, 1056, 96, 288), 13, 3, 4, 12, 17, 2),    # tasks of two m-tiles, partial n-tiles
    ((48, 1088, 128, 320), 21, 3, 2, 0, 9, 4),     # tasks of four m-tiles, two consumers, the ring that fits
], ids=["one-task", "two-layers", "two-warps", "every-sm", "two-m-tiles", "four-m-tiles"])
def test_ring_batch_cuda_smallest_first(rb, dims, batch, slots, consumers, ring_kb, grid, m_tiles):
    """The chain from its smallest form up, each against its twin and float64 and checked by the watchdog:
    where test_ring_batch_cuda fails, which of these fail says how much of the protocol it takes."""
    weights, acts = _chain(dims, batch, torch.device("cuda"), 1)
    chain = rb.RingBatch(weights, acts, slots=slots, consumers=consumers, ring_kb=ring_kb or None,
                         grid=grid or None, m_tiles=m_tiles)
    chain.run()
    rb.check(chain)
    assert chain.counters.tolist() == [d // (16 * m_tiles) for d in dims[1:]]
    _check_layers(rb, chain)


@pytest.mark.cuda
@pytest.mark.skipif(not import_benchmark("ring_chain").available(), reason="needs an sm_90 GPU and nvcc")
def test_ring_batch_cuda_register_path_stride(rb):
    """Batches 1 to 8 read B fragments from L2 8 bytes at a time: rows whose stride is a multiple of 4 but not of 8
    elements against the twin and float64, the same bits as with a stride of 8 (test_ring_batch_cuda's strides are
    multiples of 8, which staged batches need)."""
    dims = (64, 1056, 96, 288)  # N multiples of 32: tasks of two m-tiles
    weights, _ = _chain(dims, 8, torch.device("cuda"), 4)
    x0 = torch.randn(8, dims[0], generator=torch.Generator().manual_seed(5)).to(torch.bfloat16).cuda()
    outs = []
    for pad in (4, 8):
        buf = torch.full((len(dims), 8, max(dims) + pad), float("nan"), dtype=torch.bfloat16, device="cuda")
        acts = [buf[i, :, :d] for i, d in enumerate(dims)]
        acts[0].copy_(x0)
        chain = rb.RingBatch(weights, acts, slots=3, consumers=4, ring_kb=24, m_tiles=2)
        chain.run()
        rb.check(chain)
        assert chain.counters.tolist() == [d // 32 for d in dims[1:]]
        _check_layers(rb, chain)
        outs.append([a.clone() for a in acts[1:]])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.skipif(not import_benchmark("ring_chain").available(), reason="needs an sm_90 GPU and nvcc")
def test_ring_batch_cuda(rb):
    """Odd shapes (layers with fewer tasks than SMs, K of 2 to 260 k-tiles), batches 1, 3, 8, 13 and 32 (one to
    four n-tiles, partial ones), rings of 1 to 8 slots and 1 to 4 consumers, grids 1, 3, 17 and every SM, tasks
    of 16, 32 and 64 rows: each layer's output from the input the kernel stored against its fp32 twin and float64;
    the same bits for every ring, grid and task size, for a batch row whatever the batch, after a graph replay,
    with the profile's stamps; the diagnostics keep the protocol."""
    device = torch.device("cuda")
    dims = [32, 1088, 64, 4160, 64, 320]  # N multiples of 64: tasks of two and four m-tiles too
    weights, _ = _chain(dims, 1, device, 0)
    x0 = torch.randn(32, dims[0], generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).to(device)
    packed = {m: [rb.pack(w, m) for w in weights] for m in (1, 2, 4)}
    reference = None
    for batch in (32, 1, 3, 8, 13):
        buf = torch.empty(len(dims), batch, max(dims) + 8, dtype=torch.bfloat16, device=device)  # row stride
        acts = [buf[i, :, :d] for i, d in enumerate(dims)]
        acts[0].copy_(x0[:batch])
        first = None
        for slots, consumers, ring_kb, grid, m_tiles in ((8, 4, 96, None, 1), (8, 4, 96, None, 2),
                                                         (1, 1, 8, None, 2), (2, 2, 16, 3, 1), (8, 4, 40, 17, 2),
                                                         (6, 2, 30, 1, 1), (4, 4, None, None, 4),
                                                         (3, 2, 48, 5, 4)):
            buf[1:].fill_(float("nan"))
            chain = rb.RingBatch(weights, acts, slots=slots, consumers=consumers, ring_kb=ring_kb, grid=grid,
                                 packed=packed[m_tiles], m_tiles=m_tiles)
            chain.run()
            rb.check(chain)  # no wait gave up (the watchdog would name it)
            assert chain.counters.tolist() == [n // (16 * m_tiles) for n in dims[1:]]
            if first is None:
                _check_layers(rb, chain)
                first = [a.clone() for a in acts[1:]]
            for a, b in zip(acts[1:], first):
                assert torch.equal(a, b), (batch, slots, consumers, grid, m_tiles)
        if reference is None:
            reference = first
        for a, b in zip(first, reference):  # batch row n's bits do not depend on the other rows
            assert torch.equal(a, b[:batch]), batch
    ring_chain = import_benchmark("ring_chain")
    profiled = rb.RingBatch(weights, acts, slots=4, consumers=2, ring_kb=24, grid=17, packed=packed[2], m_tiles=2,
                            profile=True)
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
    for mode in ("stream", "compute", "compute-no-x", "compute-no-wait"):  # every task counted, no hang
        diag = rb.RingBatch(weights, acts, slots=4, consumers=2, ring_kb=24, mode=mode, packed=packed[1])
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
