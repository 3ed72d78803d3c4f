"""The whole-layer ring prototype of benchmarks/ring_layer.py (issue 26): its packings and task plan, its fp32 twin
against the float64 stage checks (and the checks catching wrong conventions) on the CPU; on an sm_90 GPU, the
one-launch kernel against the same checks, eagerly and replayed from a CUDA graph, for several rings, grids, splits
and group sizes."""

import math

import pytest
import torch

from conftest import import_benchmark


@pytest.fixture(scope="module")
def rl():
    return import_benchmark("ring_layer")


def _model(device="cpu", layers=2, heads=4, kv_heads=2, head_dim=32, hidden=128, ffn=96):
    from cqil_kernels.bench import random_model

    return random_model("smollm2-135m", torch.bfloat16, torch.device(device), hidden_size=hidden,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                        intermediate_size=ffn, num_hidden_layers=layers)


def test_pack_qkv_orders_heads_by_kv_head_and_rope_pairs_side_by_side(rl):
    """4 query heads over 2 kv heads, head_dim 4: kv head 0's query heads 0 and 1, its key, its value, then kv
    head 1's; each head's rows (0, 2, 1, 3)."""
    wq, wk, wv = (torch.arange(n * 3, dtype=torch.float32).view(n, 3) + 1000 * i
                  for i, n in enumerate((16, 8, 8)))
    packed = rl.pack_qkv(wq, wk, wv, Dh=4)
    rows = torch.cat([wq, wk, wv])
    assert rl.qkv_heads(4, 2) == [0, 1, 4, 6, 2, 3, 5, 7]
    order = [4 * h + i for h in rl.qkv_heads(4, 2) for i in (0, 2, 1, 3)]
    assert torch.equal(packed, rows[order])


def test_pack_gate_up_blocks(rl):
    wg = torch.arange(12, dtype=torch.float32).view(6, 2)
    wu = -wg
    packed = rl.pack_gate_up(wg, wu, rows=2)
    assert torch.equal(packed, torch.cat([wg[0:2], wu[0:2], wg[2:4], wu[2:4], wg[4:6], wu[4:6]]))


def test_split_positions(rl):
    """About one split per block over the kv heads, at least 16 positions, at most MAX_SPLITS splits."""
    assert rl.split_positions(512, 32, 132) == 128   # 32 kv heads x 4 splits: 128 tasks
    assert rl.split_positions(512, 3, 132) == 16     # 3 kv heads x 32 splits
    assert rl.split_positions(0, 8, 132) == 16
    assert rl.split_positions(4095, 3, 132) == 128 and -(-4095 // 128) <= rl.MAX_SPLITS
    with pytest.raises(ValueError, match="splits, over"):
        rl.plan(rl.Shape(D=128, H=4, Hkv=2, Dh=32, F=96, eps=1e-5), 1, 65 * 16, 2048, 2, max_positions=16)


def test_split_ranges_are_pages_of_the_cache(rl):
    assert rl.split_ranges(37, 16) == [(0, 16), (16, 16), (32, 5)]
    assert rl.split_ranges(32, 16) == [(0, 16), (16, 16)]
    assert rl.split_ranges(0, 16) == [(0, 0)]
    assert rl.page_positions(32, 2048) == 16 and rl.page_positions(32, 2048, most=4) == 4
    assert rl.page_positions(128, 44032) == 64 and rl.page_positions(64, 44032) == 128


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("pos,most,grid", [(37, 16, 5), (0, 16, 3), (130, 4, 1), (64, 8, 7)])
def test_plan_covers_every_row_and_position_once(rl, pos, most, grid, per_head):
    """Per sub-layer, the GEMV tasks tile the rows and the attention tasks each kv head's positions 0..pos-1, the
    current one in the last split; every task is one page, numbered as its place in its block's list; each block's
    first task of a sub-layer is marked; every task waits for all tasks of the sub-layer before, or per_head,
    attention for its kv head's QKV rows (counted on a counter of their own)."""
    shape = rl.Shape(D=128, H=4, Hkv=2, Dh=32, F=96, eps=1e-5)
    p = rl.plan(shape, layers=2, pos=pos, slot_bytes=2048, grid=grid, max_positions=most, per_head=per_head)
    splits = p["splits"]
    assert splits == max(1, -(-pos // min(most, 16)))
    tasks, off = p["tasks"].tolist(), p["task_off"].tolist()
    assert off[0] == 0 and off[-1] == len(tasks) and len(off) == grid + 1
    rows_of = {"qkv": (4 + 4) * 32, "o": 128, "gate_up": 96, "down": 128}
    for sub, count in enumerate(p["sub_tasks"]):
        kind, layer = sub % 5, sub // 5
        mine = [t for t in tasks if (t[0], t[1]) == (kind, layer)]
        assert len(mine) == count
        if per_head and rl.KINDS[kind] in ("qkv", "attn"):
            base = 5 * 2 + layer * 2  # the layer's kv heads' QKV counters
            if rl.KINDS[kind] == "qkv":  # 4 * 32 rows a kv head (2 query heads, its key and value)
                assert all(t[5] == base + t[2] // 128 for t in mine)
                assert all((t[11], t[6]) == ((sub - 1, p["sub_tasks"][sub - 1]) if sub else (-1, 0)) for t in mine)
            else:
                assert all((t[11], t[6]) == (base + t[8], 128 // p["rows"]["qkv"]) for t in mine)
                assert all(t[5] == sub for t in mine)
        else:
            assert all(t[5] == sub for t in mine)
            assert all((t[11], t[6]) == ((sub - 1, p["sub_tasks"][sub - 1]) if sub else (-1, 0)) for t in mine)
        if rl.KINDS[kind] == "attn":
            for head in range(2):
                spans = sorted((t[9], t[2], t[3], t[10]) for t in mine if t[8] == head)
                assert [s[0] for s in spans] == list(range(splits))
                covered = [q for _, first, n, _ in spans for q in range(first, first + n)]
                assert covered == list(range(pos))
                assert [s[3] for s in spans] == [0] * (splits - 1) + [1]
        else:
            covered = sorted(r for t in mine for r in range(t[2], t[2] + t[3]))
            assert covered == list(range(rows_of[rl.KINDS[kind]]))
    assert p["counters"][:10] == [0 if per_head and k % 5 == 0 else n for k, n in enumerate(p["sub_tasks"])]
    for b in range(grid):
        block = tasks[off[b]:off[b + 1]]
        seen = set()
        for page, t in enumerate(block):
            assert t[4] == page
            sub = 5 * t[1] + t[0]
            assert t[7] == int(sub not in seen)
            seen.add(sub)
        assert [5 * t[1] + t[0] for t in block] == sorted(5 * t[1] + t[0] for t in block)


def test_shape_refusals(rl):
    with pytest.raises(ValueError, match="head_dim"):
        rl.Shape(D=128, H=4, Hkv=2, Dh=48, F=96, eps=1e-5)
    with pytest.raises(ValueError, match="groups"):
        rl.Shape(D=128, H=10, Hkv=2, Dh=32, F=96, eps=1e-5)
    with pytest.raises(ValueError, match="fits a slot"):
        rl.plan(rl.Shape(D=1024, H=4, Hkv=2, Dh=32, F=96, eps=1e-5), 1, 4, 2048, 2)
    with pytest.raises(ValueError, match="divide slots"):
        rl.RingLayers(_model(), 4, slots=3, consumers=2, ring_kb=8, grid=2)
    with pytest.raises(ValueError, match="mode must be one of"):
        rl.RingLayers(_model(), 4, ring_kb=8, grid=2).run("fast")


@pytest.mark.parametrize("heads,kv_heads,head_dim,pos,most,grid", [
    (4, 2, 32, 37, 16, 5), (4, 4, 64, 0, 16, 3), (6, 2, 32, 130, 256, 1), (8, 2, 32, 64, 4, 7)])
def test_twin_within_the_stage_bounds(rl, heads, kv_heads, head_dim, pos, most, grid):
    """The fp32 twin of the kernel's plan (the same roundings at the same points) is within every sub-layer's
    float64 bound, for groups of 1 to 4 query heads, an empty cache, one split and more, one block and more."""
    ring = rl.RingLayers(_model(heads=heads, kv_heads=kv_heads, head_dim=head_dim), pos, ring_kb=8,
                         page_positions=most, grid=grid)
    rl.twin(ring)
    worst = rl.check_stages(ring)
    assert all(0 < v <= 1 for k, v in worst.items() if not (k == "attn" and pos == 0)), worst


def test_the_stage_checks_catch_wrong_conventions(rl):
    """A rotation by the wrong pairing, attention of the wrong kv head and an h_mid one element off each fail."""
    def run():
        ring = rl.RingLayers(_model(), 37, ring_kb=8, grid=3)
        rl.twin(ring)
        return ring

    ring = run()
    q = ring.layers[0]["q"].view(4, 32)
    q.copy_(q.view(4, 16, 2).transpose(1, 2).reshape(4, 32))  # pairs (2i, 2i + 1) instead of (i, i + 16)
    with pytest.raises(AssertionError, match="layer 0 qkv"):
        rl.check_stages(ring)
    ring = run()
    attn = ring.layers[1]["attn"].view(4, 32)
    attn.copy_(attn[[2, 3, 0, 1]])  # each query head given the other kv head's output
    with pytest.raises(AssertionError, match="layer 1 attention"):
        rl.check_stages(ring)
    ring = run()
    ring.layers[0]["hmid"][5] += 8 * ring.layers[0]["hmid"][5].abs().clamp_min(1e-3) * 2 ** -7
    with pytest.raises(AssertionError, match="layer 0 o_proj"):
        rl.check_stages(ring)


def test_the_twin_decodes_as_the_attention_definition(rl):
    """The twin's attention at one head, recomputed directly: softmax(q k^T / sqrt(Dh)) v over positions 0..pos."""
    ring = rl.RingLayers(_model(), 21, ring_kb=8, page_positions=8, grid=2)
    rl.twin(ring)
    lw = ring.layers[0]
    q = lw["q"].double().view(4, 32)[3]
    k, v = lw["k"][1, :22].double(), lw["v"][1, :22].double()  # query head 3 reads kv head 3 // 2
    o = torch.softmax(k @ q / math.sqrt(32), 0) @ v
    torch.testing.assert_close(lw["attn"].view(4, 32)[3].double(), o, rtol=2 ** -7, atol=1e-4)


def _simulate(rl, ring, seed: int, release_at_end: bool = False, attn_waits: bool = True, slow: int | None = None):
    """ring_layer.cu's protocol, each block's producer and consumer warps as agents stepped in a random order
    (seeded; `slow`: that consumer warp of every block moves only when nothing else can). The barriers as the
    hardware's (a slot's `full` and `empty` waited on a parity), the counters, the blocks' x buffers with their tags
    and the attention's tickets as the kernel's. Raises where a wait passes on the wrong phase (a page read from a
    slot holding another, a slot refilled before its page was read), where a task reads what is not complete yet
    (a staged input, a residual, q or the current key, another split's partials) or an x buffer already
    overwritten, and where no agent can move before all are done (a deadlock). release_at_end / attn_waits=False:
    the two mistakes the kernel does not make (a warp counting its tasks only at its end; attention not waiting
    for QKV), for the test that the simulator sees them. Returns the counters."""
    import random

    rng = random.Random(seed)
    plan = ring.plan
    tasks, off = plan["tasks"].tolist(), plan["task_off"].tolist()
    total = plan["sub_tasks"]
    L, Hkv, splits, slots, C = ring.L, ring.shape.Hkv, ring.splits, ring.slots, ring.consumers
    head_rows = (ring.shape.H // Hkv + 2) * ring.shape.Dh  # a kv head's QKV rows
    counters, computed = [0] * len(plan["counters"]), [0] * (5 * L)
    tickets, merged = [[0] * Hkv for _ in range(L)], [0] * L
    qkv_done = [[0] * Hkv for _ in range(L)]  # tasks of each kv head's QKV rows computed
    qkv_total = [[0] * Hkv for _ in range(L)]
    for t in tasks:
        if t[0] == 0:
            qkv_total[t[1]][t[2] // head_rows] += 1

    def complete(sub):
        if sub >= 0 and computed[sub] != total[sub]:
            raise RuntimeError(f"sub-layer {sub} read with {computed[sub]} of its {total[sub]} tasks done")

    def producer(blk):
        for page, t in enumerate(blk["tasks"]):  # one page a task
            s, use = page % slots, page // slots
            if use:
                yield lambda s=s, use=use: blk["empty"][s] % 2 != (use - 1) % 2
                if blk["holds"][s] is not None and not blk["read"][s]:
                    raise RuntimeError(f"page {page} refilled slot {s} before page {blk['holds'][s]} was read")
            blk["holds"][s], blk["read"][s] = page, False
            blk["full"][s] += 1

    def take(blk, page):
        s = page % slots
        yield lambda: blk["full"][s] % 2 != (page // slots) % 2
        if blk["holds"][s] != page:
            raise RuntimeError(f"page {page} read from slot {s}, which holds page {blk['holds'][s]}")
        blk["read"][s] = True
        blk["empty"][s] += 1

    def consumer(blk, w):
        done_on, done = -1, 0
        for t in blk["tasks"][w::C]:
            kind, layer = t[0], t[1]
            sub, b = 5 * layer + kind, (5 * layer + kind) % 2
            if done and t[5] != done_on and not release_at_end:
                counters[done_on] += done
                done = 0
            if (kind == 1 and attn_waits) or (kind != 1 and t[7]):
                if t[6]:
                    yield lambda t=t: counters[t[11]] >= t[6]
            if kind != 1:
                if t[7]:  # stage: the sub-layer before complete; o reads the merged attention, the others their input
                    complete(sub - 1)
                    if kind == 2 and merged[layer] != Hkv:
                        raise RuntimeError(f"layer {layer}'s attention staged with {merged[layer]} heads merged")
                    blk["tag"][b] = sub + 1
                else:
                    yield lambda b=b, sub=sub: blk["tag"][b] == sub + 1
                yield from take(blk, t[4])
                if blk["tag"][b] != sub + 1:
                    raise RuntimeError(f"sub-layer {sub}'s x overwritten by sub-layer {blk['tag'][b] - 1}'s")
                if kind in (2, 4):  # the residual: h (the layer before's down) or h_mid (o_proj)
                    complete(sub - 2 if kind == 2 else sub - 2)
            else:
                yield from take(blk, t[4])
                if qkv_done[layer][t[8]] != qkv_total[layer][t[8]]:  # its q heads, key and value at pos
                    raise RuntimeError(f"kv head {t[8]} of layer {layer} read with {qkv_done[layer][t[8]]} of its "
                                       f"{qkv_total[layer][t[8]]} QKV tasks done")
                tickets[layer][t[8]] += 1
                if tickets[layer][t[8]] == splits:
                    merged[layer] += 1
            if kind == 0:
                qkv_done[layer][t[2] // head_rows] += 1
            computed[sub] += 1
            done_on, done = t[5], done + 1
        if done:
            counters[done_on] += done

    agents = []
    for b in range(len(off) - 1):
        blk = dict(tasks=tasks[off[b]:off[b + 1]], full=[0] * slots, empty=[0] * slots, holds=[None] * slots,
                   read=[False] * slots, tag=[0, 0])
        agents.append([producer(blk), None, "producer"])
        agents += [[consumer(blk, w), None, w] for w in range(C)]
    live = agents
    while live:
        ready = []
        for a in live:
            if a[1] is None or a[1]():
                ready.append(a)
        fast = [a for a in ready if a[2] != slow]
        if not ready:
            raise RuntimeError(f"deadlock: counters {counters} of {plan['counters']}")
        a = rng.choice(fast or ready)
        try:
            a[1] = next(a[0])
        except StopIteration:
            live = [x for x in live if x is not a]
    return counters


@pytest.mark.parametrize("per_head", [False, True], ids=["sub-layer-waits", "per-head-waits"])
@pytest.mark.parametrize("pos,most,grid,slots,consumers", [
    (37, 16, 5, 4, 4), (0, 16, 3, 2, 2), (130, 4, 1, 1, 1), (64, 8, 7, 3, 1), (300, 16, 2, 4, 2)])
def test_protocol(rl, pos, most, grid, slots, consumers, per_head):
    """The plan under the kernel's protocol completes every sub-layer, every wait meaning what it names, in random
    interleavings, with one consumer warp of every block lagging, down to one slot and one consumer; attention
    waiting for the whole QKV sub-layer or for its own kv head's rows."""
    ring = rl.RingLayers(_model(layers=3), pos, slots=slots, consumers=consumers, ring_kb=8, page_positions=most,
                         grid=grid, per_head=per_head)
    for seed in range(4):
        for slow in (None, consumers - 1):
            assert _simulate(rl, ring, seed, slow=slow) == ring.plan["counters"]


def test_the_simulation_is_not_blind(rl):
    """Attention that does not wait for QKV reads an incomplete q; warps that count their tasks only at their end
    deadlock (a block's first task of the next sub-layer waits for counts its own block holds back); a slot shared
    by two warps lets a wait pass on the wrong page."""
    ring = rl.RingLayers(_model(layers=2), 37, slots=2, consumers=2, ring_kb=8, grid=3, per_head=True)
    with pytest.raises(RuntimeError, match="read with"):
        for seed in range(20):
            _simulate(rl, ring, seed, attn_waits=False)
    with pytest.raises(RuntimeError, match="deadlock"):
        _simulate(rl, ring, 0, release_at_end=True)
    # slots not a multiple of the consumers (RingLayers refuses it): one slot for two warps, and a warp that has read
    # its page waits for its next one on the parity its own page completed
    ring.slots = 1
    with pytest.raises(RuntimeError, match="read from slot|refilled slot"):
        for seed in range(50):
            _simulate(rl, ring, seed)


def test_main_on_the_cpu_with_the_twin(rl, monkeypatch, tmp_path):
    """main() end to end with the kernel's launches replaced by the twin and the GPU's timers by stand-ins: the
    checks, the per-head plan's equality, the variants and the record (what the next GPU run executes first)."""
    import json

    import cqil_kernels.bench as bench
    import cqil_kernels.ops._common as common

    make = bench.random_model
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "random_model", lambda shape, dtype, device, **kw: make(  # a small model, its layers
        shape, dtype, torch.device("cpu"), hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        intermediate_size=96, num_hidden_layers=kw["num_hidden_layers"]))
    monkeypatch.setattr(bench, "_warm_up_gpu", lambda device, seconds=1.0: None)
    monkeypatch.setattr(bench, "copy_bandwidth_gbps", lambda device: 3000.0)
    monkeypatch.setattr(bench, "_time_ours", lambda model, ids, new, repeats: (1.0, 0.01 * len(model.layers)))
    monkeypatch.setattr(bench, "card", lambda device: "stand-in")
    monkeypatch.setattr(common, "capture_launches", lambda launch, calls: launch(0))  # the "graph": its layers
    monkeypatch.setattr(common, "replay_median_us", lambda layers, calls, rounds: 5.0 * layers)
    monkeypatch.setattr(rl.RingLayers, "run", lambda self, mode="layers": (rl.twin(self), self.L)[1])
    out = tmp_path / "ring_layer.json"
    rl.main(["--shape", "smollm2-135m", "--layers", "1", "--layers", "2", "--prompt", "40", "--rounds", "2",
             "--per-head", "--diagnose", "--tp", "3", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["title"].endswith("smollm2-135m, the TP3 shard's layer")
    # the TP3 shard of SmolLM2's layer (3 heads over 1 kv head, F 512) and 40 positions of its cache, bf16
    assert record["layer_mb"] == round(2 * (576 * 64 * (3 + 2) + 3 * 64 * 576 + 3 * 576 * 512 + 2 * 576
                                            + 2 * 40 * 64) / 1e6, 2)
    assert [r[0] for r in record["rows"]] == ["ours (graph-replayed decode step)", "ring_layer (one launch)",
                                              "ring_layer, attention waiting per kv head",
                                              "ring_layer stream only (diagnostic)",
                                              "ring_layer compute only (diagnostic)"]
    assert [r[3] for r in record["rows"]] == [10.0, 5.0, 5.0, 5.0, 5.0]  # the stand-ins' us a layer
    assert set(record["checks"]) == {"1", "2"} and all(0 < v <= 1 for c in record["checks"].values()
                                                       for v in c.values())


def test_profile_summary(rl):
    """Per sub-layer, µs: medians of the waits and compute, and the boundary from the sub-layer before's last store
    to this one's first task holding its input."""
    ring = rl.RingLayers(_model(layers=1), 5, ring_kb=8, grid=2, profile=True)
    subs = (5 * ring.plan["tasks"][:, 1] + ring.plan["tasks"][:, 0]).tolist()
    for i, sub in enumerate(subs):  # sub-layer j's tasks: taken at 10 j + 1, x 2 us on, data + 1, stored + 3
        ring.prof[i] = torch.tensor([1000 * (10 * sub + 1), 1000 * (10 * sub + 1), 1000 * (10 * sub + 3),
                                     1000 * (10 * sub + 4), 1000 * (10 * sub + 7)])
    rows = rl.profile_summary(ring)
    assert [r["kind"] for r in rows] == list(rl.KINDS)
    assert all((r["wait x"], r["wait data"], r["compute"]) == (2.0, 1.0, 3.0) for r in rows)
    assert rows[0]["boundary"] is None and all(r["boundary"] == 6.0 for r in rows[1:])  # 10 j + 3 - (10 (j-1) + 7)
    assert [(r["layer"], r["kind"]) for r in rows] == [(0, kind) for kind in rl.KINDS]
    assert [r["tasks"] for r in rows] == ring.plan["sub_tasks"]


gpu = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)),
                         reason="the ring kernel needs an sm_90 GPU (and nvcc)")


@gpu
@pytest.mark.parametrize("heads,kv_heads,head_dim,hidden,ffn,pos,slots,most,grid", [
    (4, 2, 32, 128, 96, 37, "4", 16, 5), (4, 4, 64, 256, 352, 0, "2", 256, 3),
    (9, 3, 64, 576, 1536, 130, "4:2", 256, 1), (8, 2, 64, 512, 1024, 300, "3", 32, 17),
    (32, 32, 128, 4096, 11008, 511, "4", 256, None), (4, 2, 32, 128, 96, 600, "4", 16, 7)])
def test_kernel_within_the_stage_bounds(rl, heads, kv_heads, head_dim, hidden, ffn, pos, slots, most, grid):
    """Every sub-layer of every layer of a launch within its float64 bound; a graph replay and a second launch
    store the same bits (the sums' order does not depend on timing), also after the two diagnostics ran, and so
    does the per-head plan on the same buffers."""
    if not rl.available():
        pytest.skip("nvcc not found")
    model = _model("cuda", heads=heads, kv_heads=kv_heads, head_dim=head_dim, hidden=hidden, ffn=ffn)
    s, _, c = slots.partition(":")
    ring = rl.RingLayers(model, pos, slots=int(s), consumers=int(c) if c else None, page_positions=most, grid=grid)
    ring.run()
    rl.check(ring)
    rl.check_stages(ring)
    first = [t.clone() for t in ring.h]
    for lw in ring.layers:
        lw["act"].zero_()
    ring.run()
    rl.check(ring)
    assert all(torch.equal(a, b) for a, b in zip(first, ring.h))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ring.run()
    for t in ring.h[1:]:
        t.zero_()
    graph.replay()
    rl.check(ring)
    assert all(torch.equal(a, b) for a, b in zip(first, ring.h))
    for mode in ("stream", "compute"):  # the diagnostics keep every wait (none gives up), then the layers again
        ring.run(mode)
        rl.check(ring)
    ring.run()
    rl.check(ring)
    assert all(torch.equal(a, b) for a, b in zip(first, ring.h))
    per_head = ring.variant(per_head=True)  # attention waiting for its own kv head's QKV rows: the same bits
    for t in ring.h[1:]:
        t.zero_()
    per_head.run()
    rl.check(per_head)
    assert all(torch.equal(a, b) for a, b in zip(first, ring.h))
