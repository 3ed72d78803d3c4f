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
    assert torch.equal(out, rb.class_sums(rb.pack(w, 1), x, range_tiles=65 * 4))  # one range: all of K
    for r in (4, 24, 64):  # K split into ranges: another order of the same sums, within the same bound
        split = rb.class_sums(rb.pack(w, 1), x, range_tiles=r)
        assert ((split.double() - ref).abs() <= bound).all()
        assert torch.equal(split[:5], rb.class_sums(rb.pack(w, 2), x[:5], range_tiles=r))


def _passes(phase: int, parity: int) -> bool:
    """mbarrier.try_wait.parity: true once the phase of that parity has completed, i.e. while the barrier's
    current phase (completed phases counted) has the other parity; it cannot tell phase k from k +/- 2."""
    return phase % 2 != parity


def _finish_ops(layer: int, tasks, splits) -> list[tuple]:
    """ring_batch.cu's finish_layer for a block's tasks of one layer: ("barrier",); where the layer is split over
    K, ("tickets", tasks) (warp 0 counts each task on its panel's ticket), per 32 tasks ("panels", tasks) (warp 0
    waits until every split of those panels is counted), ("barrier",), ("sum", tasks) (the tasks' slices summed:
    every split of their panels must have been stored) and ("barrier",); then ("publish", layer, tasks) (warp 0)."""
    ops = [("barrier",)]
    if splits[layer] > 1:
        ops.append(("tickets", tasks))
        ops += [("panels", tasks[r:r + 32]) for r in range(0, len(tasks), 32)]
        ops += [("barrier",), ("sum", tasks), ("barrier",)]
    return ops + [("publish", layer, len(tasks))]


def _consumer_ops(tasks, shapes, m_tiles: int, tiles_per_page: int, rb, ranges=None):
    """What every consumer warp of a block does, in order (ring_batch.cu's consumer loop): ("wait", layer, panels)
    (the layer's counter), ("page", i) (wait for page i's copy, read it, arrive on its slot's `empty`),
    ("barrier",) and ("store", task) at a task's end (the class sums exchanged, then the rows or partials stored),
    and _finish_ops where the block leaves a layer. ranges: k-tiles of each layer's k-ranges (default all of K)."""
    ranges = ranges or [K // 16 for _, K in shapes]
    splits = [-(-(K // 16) // r) for r, (_, K) in zip(ranges, shapes)]
    ops, ready, i, begin = [], 0, 0, 0
    for k, (layer, split, _) in enumerate(tasks):
        if k > begin and layer != tasks[k - 1][0]:
            ops += _finish_ops(tasks[begin][0], tasks[begin:k], splits)
            begin = k
        if layer and ready < layer:
            ops.append(("wait", layer - 1, shapes[layer - 1][0] // (16 * m_tiles) * splits[layer - 1]))
            ready = layer
        k_tiles = rb.pages_of(shapes[layer][1] // 16, ranges[layer])[split][1]
        for _ in rb.pages_of(k_tiles, tiles_per_page):
            ops.append(("page", i))
            i += 1
        ops += [("barrier",), ("store", tasks[k])]
    if tasks:
        ops += _finish_ops(tasks[begin][0], tasks[begin:], splits)
    return ops, i


def _simulate(rb, shapes, m_tiles: int, tiles_per_page: int, grid: int, slots: int, consumers: int,
              lazy: bool = False, empty_count: int | None = None, blocks=None, slow=(),
              barrier_count: int | None = None, ranges=None) -> list[int]:
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
    done; where a slice is summed before every split of its panel was stored; and where a split panel's partials
    (one buffer for every layer) are stored while another layer's are still being summed. blocks: the blocks'
    task lists (default plan's); slow: consumer warps that move only when nothing else can; ranges: k-tiles of
    each layer's k-ranges (default all of K). The counters count tasks (a layer's panels times its splits)."""
    empty_count = empty_count or consumers
    barrier_count = barrier_count or consumers
    ranges = ranges or [K // 16 for _, K in shapes]
    splits = [-(-(K // 16) // r) for r, (_, K) in zip(ranges, shapes)]
    blocks = blocks if blocks is not None else rb.plan(shapes, m_tiles, grid, splits)
    counters = [0] * len(shapes)
    want = [N // (16 * m_tiles) * n for (N, _), n in zip(shapes, splits)]
    tickets: dict[tuple[int, int], int] = {}  # (layer, panel) -> splits counted
    stored: dict[tuple[int, int], int] = {}   # (layer, panel) -> splits whose partials are stored
    state = []
    for tasks in blocks:
        ops, n_pages = _consumer_ops(tasks, shapes, m_tiles, tiles_per_page, rb, ranges)
        state.append(dict(issued=0, pages=n_pages, ops=ops, full=[0] * slots, arrivals=[0] * slots,
                          holds=[None] * slots, reads=[0] * slots, barrier=0, completed=0,
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
        elif op[0] == "tickets":
            if w == 0:
                for layer, _, t in op[1]:
                    tickets[layer, t] = tickets.get((layer, t), 0) + 1
        elif op[0] == "panels":
            if w == 0 and any(tickets.get((layer, t), 0) < splits[layer] for layer, _, t in op[1]):
                return False
        elif op[0] == "sum":
            for layer, _, t in op[1]:
                if stored.get((layer, t), 0) != splits[layer]:
                    raise RuntimeError(f"warp {w} summed a slice of layer {layer}'s panel {t} before its splits were "
                                       f"stored")
        elif op[0] == "store":
            layer, _, t = op[1]
            if w == 0 and splits[layer] > 1:
                busy = [other for other in range(len(shapes)) if other != layer and splits[other] > 1 and
                        any(key[0] == other for key in stored) and counters[other] < want[other]]
                if busy:
                    raise RuntimeError(f"layer {layer}'s partials stored while layer {busy[0]}'s are being summed")
                stored[layer, t] = stored.get((layer, t), 0) + 1
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
    if counters != want:
        raise RuntimeError(f"deadlock: counters {counters} of {want}")
    return counters


def test_plan_and_protocol(rb):
    """plan gives every task (layer, k-range, panel) once; a block's tasks are in chain order, its tasks of a layer
    one contiguous run of the layer's (k-range, panel) order, as many as round robin over the chain would give it;
    pages_of covers K once in order; and the protocol finishes, every wait meaning the page it names and no layer's
    partials stored while another's are summed, for every ring depth down to one slot, one to four consumers, tasks
    of one and two m-tiles, layers whole or split over K, the producer keeping up or lagging, a warp lagging."""
    shapes = [(64, 80), (160, 64), (32, 160), (288, 32)]
    for k_tiles, per in ((5, 4), (66, 8), (8, 4)):
        covered = [k for k0, t in rb.pages_of(k_tiles, per) for k in range(k0, k0 + t)]
        assert covered == list(range(k_tiles))
        assert all(k0 % 4 == 0 for k0, _ in rb.pages_of(k_tiles, per))
    for m_tiles in (1, 2):
        for ranges in (None, [4, 4, 4, 4]):
            splits = [1] * 4 if ranges is None else [2, 1, 3, 1]
            layer_tasks = [[(layer, s, t) for s in range(n) for t in range(N // (16 * m_tiles))]
                           for layer, ((N, _), n) in enumerate(zip(shapes, splits))]
            for grid in (1, 3, 17):
                blocks = rb.plan(shapes, m_tiles, grid, splits)
                assert sorted(t for b in blocks for t in b) == sorted(t for lt in layer_tasks for t in lt)
                chain_order = [t for lt in layer_tasks for t in lt]
                for b, mine in enumerate(blocks):
                    for layer, tasks in enumerate(layer_tasks):
                        run = [t for t in mine if t[0] == layer]
                        assert run == mine[mine.index(run[0]):mine.index(run[0]) + len(run)] if run else True
                        first = tasks.index(run[0]) if run else 0
                        assert run == tasks[first:first + len(run)]
                        before = sum(len(lt) for lt in layer_tasks[:layer])
                        assert len(run) == sum(1 for i in range(len(tasks)) if (before + i) % grid == b)
                    assert [t[0] for t in mine] == sorted(t[0] for t in mine)
                    assert len(mine) == len(chain_order[b::grid])
                for slots, consumers, tiles_per_page in ((1, 1, 4), (2, 2, 4), (3, 4, 8), (8, 4, 4)):
                    for lazy, slow in ((False, ()), (True, ()), (False, {consumers - 1})):
                        assert _simulate(rb, shapes, m_tiles, tiles_per_page, grid, slots, consumers, lazy=lazy,
                                         slow=slow, ranges=ranges) == [N // (16 * m_tiles) * n
                                                                       for (N, _), n in zip(shapes, splits)]


def test_range_tiles_of(rb):
    """A layer's k-ranges: all of K below batch STAGED_BATCH; from there, ranges of whole 4-k-tile groups as even
    as they can be whose x (rows rounded up to 8, 32 bytes a k-tile) fits x_kb; range_tiles where given."""
    assert rb.range_tiles_of(688, 8) == 688
    assert rb.range_tiles_of(688, 32) == 64       # 11 ranges (10 x 64 + 48) of at most 64 KiB of x
    assert rb.range_tiles_of(256, 32) == 64       # 4 of 64
    assert rb.range_tiles_of(256, 16) == 128      # 2 of 128: 16 rows take half the bytes
    assert rb.range_tiles_of(256, 9) == 128       # 9 rows are rounded up to 16
    assert rb.range_tiles_of(100, 32, x_kb=32) == 28  # 4 ranges (3 x 28 + 16), not 32 + 32 + 32 + 4
    assert rb.range_tiles_of(20, 32) == 20        # fits whole
    assert rb.range_tiles_of(688, 1, range_tiles=64) == 64
    assert rb.range_tiles_of(20, 32, range_tiles=64) == 20
    for batch in (9, 16, 24, 32):
        for k_tiles in (4, 5, 63, 64, 65, 256, 688, 1000):
            r = rb.range_tiles_of(k_tiles, batch)
            assert r == k_tiles or r % 4 == 0
            assert 4 * -(-r // 4) * 8 * -(-batch // 8) * 32 <= rb.X_KB * 1024
    with pytest.raises(ValueError, match="positive multiple of 4"):
        rb.range_tiles_of(64, 32, range_tiles=6)
    with pytest.raises(ValueError, match="holds no 4 k-tiles"):
        rb.range_tiles_of(64, 32, x_kb=1)


def test_simulation_is_not_blind(rb, monkeypatch):
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
        _simulate(rb, shapes, 1, 4, 1, 2, 2, blocks=[[(1, 0, 0), (0, 0, 0), (0, 0, 1)]])
    # the consumers' barrier completing a phase on each warp's arrival lets one warp through alone, after which
    # the other waits on a phase that has gone by: the block stops
    with pytest.raises(RuntimeError, match="deadlock|passed the consumers' barrier"):
        _simulate(rb, shapes, 1, 4, 1, 2, 2, barrier_count=1)
    # a split layer summing its slices without waiting for its panels' other splits reads partials not yet stored
    ranges = [4, 2]
    assert _simulate(rb, [(32, 128), (16, 32)], 1, 4, 3, 2, 2, ranges=ranges) == [4, 1]
    blocks = [[(0, 0, 0), (1, 0, 0)], [(0, 0, 1), (0, 1, 1), (0, 1, 0)]]  # panel 0's split 1 comes last in block 1
    assert _simulate(rb, [(32, 128), (16, 32)], 1, 4, 2, 2, 2, ranges=ranges, blocks=blocks) == [4, 1]
    monkeypatch.setattr(__import__(__name__), "_finish_ops", lambda layer, tasks, splits: [("barrier",)] + (
        [("tickets", tasks), ("barrier",), ("sum", tasks), ("barrier",)] if splits[layer] > 1 else []) + [
        ("publish", layer, len(tasks))])
    with pytest.raises(RuntimeError, match="summed a slice of layer 0's panel 0 before its splits were stored"):
        _simulate(rb, [(32, 128), (16, 32)], 1, 4, 2, 2, 2, ranges=ranges, blocks=blocks)


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
    Ran.diag = torch.tensor([4, 9, 0, 30, 17, 3, 11, 40])
    with pytest.raises(RuntimeError, match=r"panel's other splits: block 9, warp 0, page 30 .*ticket 17 at 3 of 11"):
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
    rb.RingBatch(w, [a[:8] for a in strided])  # B fragments from L2: 8 bytes
    with pytest.raises(ValueError, match="multiple of 8 and a 16-byte aligned start expected at batch 13"):
        rb.RingBatch(w, strided)  # resident x: 16-byte copies
    with pytest.raises(ValueError, match="range_tiles must be a positive multiple of 4"):
        rb.RingBatch(w, acts, range_tiles=2)
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
    sums and, from batch STAGED_BATCH on, the x buffers of the longest k-range."""
    ring_chain = import_benchmark("ring_chain")
    for batch in (1, 8, 9, 16, 32):
        for m_tiles, consumers in ((1, 4), (2, 4), (2, 2), (4, 4)):
            for slots in (2, 3, 4, 8):
                for k in (1024, 11008):
                    n = 64 * m_tiles
                    w = [torch.zeros(n, k, dtype=torch.bfloat16)]
                    acts = [torch.zeros(batch, k, dtype=torch.bfloat16), torch.zeros(batch, n, dtype=torch.bfloat16)]
                    chain = rb.RingBatch(w, acts, slots=slots, consumers=consumers, m_tiles=m_tiles)
                    need = rb.smem_bytes(slots, chain.slot_bytes, batch, m_tiles, chain.x_tiles)
                    group = 4 * rb.TILE_BYTES * m_tiles
                    more = rb.smem_bytes(slots, chain.slot_bytes + group, batch, m_tiles, chain.x_tiles)
                    assert need <= ring_chain.SMEM_LIMIT
                    assert more > ring_chain.SMEM_LIMIT or slots * (chain.slot_bytes + group) > rb.RING_KB * 1024
                    assert chain.range_tiles == [rb.range_tiles_of(k // 16, batch)]
                    assert chain.splits == [-(-(k // 16) // chain.range_tiles[0])]
                    if batch >= rb.STAGED_BATCH:
                        assert need - rb.smem_bytes(slots, chain.slot_bytes, 1, m_tiles) == \
                            chain.x_tiles * 8 * -(-batch // 8) * 32 + (-(-batch // 8) - 1) * 2 * 4 * m_tiles * 512


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
        assert_kernel_close(chain.acts[layer + 1].cpu(), rb.class_sums(rb.pack(w), x, chain.range_tiles[layer]),
                            x.double() @ w.double().t(), terms=w.shape[1])
    assert ring_chain.check_layers(chain) <= 1


@pytest.mark.cuda
@pytest.mark.skipif(not import_benchmark("ring_chain").available(), reason="needs an sm_90 GPU and nvcc")
@pytest.mark.parametrize("dims,batch,slots,consumers,ring_kb,grid,m_tiles,range_tiles", [
    ((32, 16), 1, 1, 1, 2, 1, 1, None),                # one task, one page, one block
    ((64, 48, 32), 1, 2, 1, 4, 1, 1, None),            # a layer boundary in one block, slots reused
    ((64, 48, 32), 8, 2, 2, 4, 2, 1, None),            # two consumers, two blocks, a full n-tile
    ((160, 48, 32), 3, 2, 2, 4, 2, 1, 4),              # K split in 3, x from L2: a panel's splits in one block
    ((32, 1040, 48, 272), 32, 8, 4, 16, 0, 1, None),   # four consumers, every SM, four n-tiles, K split (x fits)
    ((64, 1056, 96, 288), 13, 3, 4, 12, 17, 2, 8),     # tasks of two m-tiles, partial n-tiles, 9 k-ranges
    ((48, 1088, 128, 320), 21, 3, 2, 0, 9, 4, None),   # tasks of four m-tiles, two consumers, the ring that fits
], ids=["one-task", "two-layers", "two-warps", "split-in-l2", "every-sm", "two-m-tiles", "four-m-tiles"])
def test_ring_batch_cuda_smallest_first(rb, dims, batch, slots, consumers, ring_kb, grid, m_tiles, range_tiles):
    """The chain from its smallest form up, each against its twin and float64 and checked by the watchdog:
    where test_ring_batch_cuda fails, which of these fail says how much of the protocol it takes."""
    weights, acts = _chain(dims, batch, torch.device("cuda"), 1)
    chain = rb.RingBatch(weights, acts, slots=slots, consumers=consumers, ring_kb=ring_kb or None,
                         grid=grid or None, m_tiles=m_tiles, range_tiles=range_tiles)
    chain.run()
    rb.check(chain)
    assert chain.counters.tolist() == [d // (16 * m_tiles) * n for d, n in zip(dims[1:], chain.splits)]
    _check_layers(rb, chain)


@pytest.mark.cuda
@pytest.mark.skipif(not import_benchmark("ring_chain").available(), reason="needs an sm_90 GPU and nvcc")
def test_ring_batch_cuda_register_path_stride(rb):
    """Batches 1 to 8 read B fragments from L2 8 bytes at a time: rows whose stride is a multiple of 4 but not of 8
    elements, whole K and split over K, against the twin and float64, the same bits as with a stride of 8."""
    dims = (64, 1056, 96, 288)  # N multiples of 32: tasks of two m-tiles
    weights, _ = _chain(dims, 8, torch.device("cuda"), 4)
    x0 = torch.randn(8, dims[0], generator=torch.Generator().manual_seed(5)).to(torch.bfloat16).cuda()
    for range_tiles in (None, 12):
        outs = []
        for pad in (4, 8):
            buf = torch.full((len(dims), 8, max(dims) + pad), float("nan"), dtype=torch.bfloat16, device="cuda")
            acts = [buf[i, :, :d] for i, d in enumerate(dims)]
            acts[0].copy_(x0)
            chain = rb.RingBatch(weights, acts, slots=3, consumers=4, ring_kb=24, m_tiles=2, range_tiles=range_tiles)
            chain.run()
            rb.check(chain)
            assert chain.counters.tolist() == [d // 32 * n for d, n in zip(dims[1:], chain.splits)]
            _check_layers(rb, chain)
            outs.append([a.clone() for a in acts[1:]])
        for a, b in zip(*outs):
            assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.skipif(not import_benchmark("ring_chain").available(), reason="needs an sm_90 GPU and nvcc")
def test_ring_batch_cuda(rb):
    """Odd shapes (layers with fewer tasks than SMs, K of 2 to 260 k-tiles), batches 1, 3, 8, 13 and 32 (one to
    four n-tiles, partial ones), rings of 1 to 8 slots and 1 to 4 consumers, grids 1, 3, 17 and every SM, tasks
    of 16, 32 and 64 rows, K in k-ranges of 64 k-tiles (the wide layers in 2 to 5, each split task summing a slice
    of its panel): each layer's output from the input the kernel stored against its fp32 twin and float64; the same
    bits for every ring, grid and task size, for a batch row whatever the batch, after a graph replay, with the
    profile's stamps; the default k-ranges; the diagnostics keep the protocol."""
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
                                 packed=packed[m_tiles], m_tiles=m_tiles, range_tiles=64)
            chain.run()
            rb.check(chain)  # no wait gave up (the watchdog would name it)
            assert chain.counters.tolist() == [d // (16 * m_tiles) * n for d, n in zip(dims[1:], chain.splits)]
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
                            profile=True, range_tiles=64)
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
    buf[1:].fill_(float("nan"))
    default = rb.RingBatch(weights, acts, slots=4, consumers=4, packed=packed[1])  # batch 13: x of 64 KiB at most
    assert default.splits == [1, 1, 1, 3, 1] and default.range_tiles[3] == 88  # 260 k-tiles: 88 + 88 + 84
    default.run()
    rb.check(default)
    _check_layers(rb, default)
    for mode in ("stream", "compute", "compute-no-x", "compute-no-wait"):  # every task counted, no hang
        diag = rb.RingBatch(weights, acts, slots=4, consumers=2, ring_kb=24, mode=mode, packed=packed[1])
        diag.run()
        rb.check(diag)
        assert diag.counters.tolist() == [d // 16 * n for d, n in zip(dims[1:], diag.splits)]
    buf[1:].fill_(float("nan"))
    graph = torch.cuda.CUDAGraph()  # the last chain of the loop: batch 13, 64-row tasks, K split
    with torch.cuda.graph(graph):
        chain.run()
    graph.replay()
    rb.check(chain)
    for a, b in zip(acts[1:], first):
        assert torch.equal(a, b)
