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


def test_pack_qkv_puts_rope_pairs_side_by_side(rl):
    wq, wk, wv = (torch.arange(n * 3, dtype=torch.float32).view(n, 3) + 1000 * i
                  for i, n in enumerate((8, 4, 4)))
    packed = rl.pack_qkv(wq, wk, wv, Dh=4)
    rows = torch.cat([wq, wk, wv])
    order = [0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15]  # per head (i, i + 2)
    assert torch.equal(packed, rows[order])


def test_pack_gate_up_blocks(rl):
    wg = torch.arange(12, dtype=torch.float32).view(6, 2)
    wu = -wg
    packed = rl.pack_gate_up(wg, wu, rows=2)
    assert torch.equal(packed, torch.cat([wg[0:2], wu[0:2], wg[2:4], wu[2:4], wg[4:6], wu[4:6]]))


def test_split_ranges_cover_the_cache_in_whole_pages(rl):
    assert rl.split_ranges(37, 3, 16) == [(0, 16), (16, 16), (32, 5)]
    assert rl.split_ranges(37, 1, 16) == [(0, 37)]
    assert rl.split_ranges(0, 2, 16) == [(0, 0), (0, 0)]
    assert rl.split_ranges(10, 4, 16) == [(0, 10), (10, 0), (10, 0), (10, 0)]


@pytest.mark.parametrize("pos,splits,grid", [(37, 3, 5), (0, 2, 3), (130, 1, 1), (64, 4, 7)])
def test_plan_covers_every_row_and_position_once(rl, pos, splits, grid):
    """Per sub-layer, the GEMV tasks tile the rows and the attention tasks each kv head's positions 0..pos-1, the
    current one in the last split; each block's pages are numbered in order, its first task of a sub-layer marked,
    and every task waits for all tasks of the sub-layer before."""
    shape = rl.Shape(D=128, H=4, Hkv=2, Dh=32, F=96, eps=1e-5)
    p = rl.plan(shape, layers=2, pos=pos, splits=splits, slot_bytes=2048, grid=grid)
    tasks, off = p["tasks"].tolist(), p["task_off"].tolist()
    assert off[0] == 0 and off[-1] == len(tasks) and len(off) == grid + 1
    rows_of = {"qkv": (4 + 4) * 32, "o": 128, "gate_up": 96, "down": 128}
    for sub, count in enumerate(p["sub_tasks"]):
        kind, layer = sub % 5, sub // 5
        mine = [t for t in tasks if (t[0], t[1]) == (kind, layer)]
        assert len(mine) == count
        assert all(t[6] == (p["sub_tasks"][sub - 1] if sub else 0) for t in mine)
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
    for b in range(grid):
        block = tasks[off[b]:off[b + 1]]
        page, seen = 0, set()
        for t in block:
            assert t[4] == page
            page += t[5]
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
        rl.plan(rl.Shape(D=1024, H=4, Hkv=2, Dh=32, F=96, eps=1e-5), 1, 4, 1, 2048, 2)


@pytest.mark.parametrize("heads,kv_heads,head_dim,pos,splits,grid", [
    (4, 2, 32, 37, 3, 5), (4, 4, 64, 0, 2, 3), (6, 2, 32, 130, 1, 1), (8, 2, 32, 64, 4, 7)])
def test_twin_within_the_stage_bounds(rl, heads, kv_heads, head_dim, pos, splits, grid):
    """The fp32 twin of the kernel's plan (the same roundings at the same points) is within every sub-layer's
    float64 bound, for groups of 1 to 4 query heads, an empty cache, one split and more, one block and more."""
    ring = rl.RingLayers(_model(heads=heads, kv_heads=kv_heads, head_dim=head_dim), pos, ring_kb=8, splits=splits,
                         grid=grid)
    rl.twin(ring)
    worst = rl.check_stages(ring)
    assert all(0 < v <= 1 for k, v in worst.items() if not (k == "attn" and pos == 0)), worst


def test_the_stage_checks_catch_wrong_conventions(rl):
    """A rotation by the wrong pairing, attention of the wrong kv head and an h_mid one element off each fail."""
    def run():
        ring = rl.RingLayers(_model(), 37, ring_kb=8, splits=2, grid=3)
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
    ring = rl.RingLayers(_model(), 21, ring_kb=8, splits=2, grid=2)
    rl.twin(ring)
    lw = ring.layers[0]
    q = lw["q"].double().view(4, 32)[3]
    k, v = lw["k"][1, :22].double(), lw["v"][1, :22].double()  # query head 3 reads kv head 3 // 2
    o = torch.softmax(k @ q / math.sqrt(32), 0) @ v
    torch.testing.assert_close(lw["attn"].view(4, 32)[3].double(), o, rtol=2 ** -7, atol=1e-4)


def test_profile_summary(rl):
    """Per sub-layer, µs: medians of the waits and compute, and the boundary from the sub-layer before's last store
    to this one's first task holding its input."""
    ring = rl.RingLayers(_model(layers=1), 5, ring_kb=8, splits=1, grid=2, profile=True)
    subs = (5 * ring.plan["tasks"][:, 1] + ring.plan["tasks"][:, 0]).tolist()
    for i, sub in enumerate(subs):  # sub-layer j's tasks: taken at 10 j, x at 10 j + 2, data + 1, stored + 3
        ring.prof[i] = torch.tensor([1000 * (10 * sub), 1000 * (10 * sub), 1000 * (10 * sub + 2),
                                     1000 * (10 * sub + 3), 1000 * (10 * sub + 6)])
    rows = rl.profile_summary(ring)
    assert [r["kind"] for r in rows] == list(rl.KINDS)
    assert all((r["wait x"], r["wait data"], r["compute"]) == (2.0, 1.0, 3.0) for r in rows)
    assert rows[0]["boundary"] is None and all(r["boundary"] == 6.0 for r in rows[1:])  # 10 j + 2 - (10 (j-1) + 6)
    assert [r["tasks"] for r in rows] == ring.plan["sub_tasks"]


gpu = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)),
                         reason="the ring kernel needs an sm_90 GPU (and nvcc)")


@gpu
@pytest.mark.parametrize("heads,kv_heads,head_dim,hidden,ffn,pos,slots,splits,grid", [
    (4, 2, 32, 128, 96, 37, "4", 3, 5), (4, 4, 64, 256, 352, 0, "2", 2, 3), (9, 3, 64, 576, 1536, 130, "4:2", 1, 1),
    (8, 2, 64, 512, 1024, 300, "3", 4, 17), (32, 32, 128, 4096, 11008, 511, "4", None, None)])
def test_kernel_within_the_stage_bounds(rl, heads, kv_heads, head_dim, hidden, ffn, pos, slots, splits, grid):
    """Every sub-layer of every layer of a launch within its float64 bound; a graph replay and a second launch
    store the same bits (the sums' order does not depend on timing)."""
    if not rl.available():
        pytest.skip("nvcc not found")
    model = _model("cuda", heads=heads, kv_heads=kv_heads, head_dim=head_dim, hidden=hidden, ffn=ffn)
    s, _, c = slots.partition(":")
    ring = rl.RingLayers(model, pos, slots=int(s), consumers=int(c) if c else None, splits=splits, grid=grid)
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
