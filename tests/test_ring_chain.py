"""The ring-chain prototype of benchmarks/ring_chain.py (issue 26): its task plan on the CPU; on an sm_90 GPU,
every layer of the one-launch chain against its fp32 twin and float64, for every ring depth, eagerly and
replayed from a CUDA graph."""

import pytest
import torch

from conftest import assert_kernel_close, import_benchmark


@pytest.fixture(scope="module")
def ring():
    return import_benchmark("ring_chain")


def test_rows_per_task(ring):
    """The largest power of two up to MAX_ROWS that divides N and fits the slot."""
    assert ring.rows_per_task(11008, 4096, 44032) == 4   # 5 rows would fit; 5 is no power of two
    assert ring.rows_per_task(4096, 11008, 44032) == 2
    assert ring.rows_per_task(4096, 4096, 1 << 20) == ring.MAX_ROWS
    assert ring.rows_per_task(40, 8, 1 << 20) == 8
    assert ring.rows_per_task(36, 8, 1 << 20) == 4       # 8 does not divide 36
    assert ring.rows_per_task(7, 8, 1 << 20) == 1
    with pytest.raises(ValueError, match="does not fit a slot"):
        ring.rows_per_task(8, 4096, 8190)


def test_plan_covers_every_row_once(ring):
    """Layers in order, then rows; each layer's rows tiled exactly once by tasks of one size."""
    shapes = [(40, 264), (1000, 40), (24, 1000)]
    tasks = ring.plan(shapes, 4096)
    assert [t[0] for t in tasks] == sorted(t[0] for t in tasks)
    for layer, (N, K) in enumerate(shapes):
        mine = [(row0, rows) for lay, row0, rows, k in tasks if lay == layer and k == K]
        assert len({rows for _, rows in mine}) == 1
        covered = [r for row0, rows in mine for r in range(row0, row0 + rows)]
        assert covered == list(range(N))
        assert mine[0][1] * K * 2 <= 4096
    assert {lay: rows for lay, _, rows, _ in tasks} == {0: 4, 1: 8, 2: 2}


def test_first_of_layer(ring):
    """Block g % grid runs tasks g, g + grid, ...: its first task of a layer stages that layer's x."""
    tasks = [(0, r, 1, 8) for r in range(5)] + [(1, r, 1, 8) for r in range(3)]
    assert ring.first_of_layer(tasks, 3) == [True, True, True, False, False, True, True, True]
    assert ring.first_of_layer(tasks, 2) == [True, True, False, False, False, True, True, False]
    assert ring.first_of_layer(tasks, 8) == [True] * 8
    assert ring.first_of_layer(tasks, 1) == [True, False, False, False, False, True, False, False]


def test_profile_summary(ring):
    """Per layer: medians of the waits and the compute, the span, and the boundary from the last store of the
    layer before to the first task holding x (stamps in ns, summary in µs from the first stamp)."""

    class Profiled:
        weights = [None, None]
        task_layers = torch.tensor([0, 0, 1])
        #                         issued taken  x     data  stored
        prof = torch.tensor([[1000, 1000, 2000, 3000, 5000],
                             [1500, 2000, 2000, 4000, 6000],
                             [3000, 6000, 9000, 9500, 12000]])

    rows = ring.profile_summary(Profiled)
    assert rows[0] == {"layer": 0, "tasks": 2, "wait x": 0.5, "wait data": 1.5, "compute": 2.0, "in flight": 2.25,
                       "first issued": 0.0, "last stored": 5.0, "boundary": None}
    assert rows[1]["boundary"] == 3.0 and rows[1]["wait x"] == 3.0 and rows[1]["last stored"] == 11.0
    Profiled.prof = Profiled.prof.clone()
    Profiled.prof[2, 4] = 0
    with pytest.raises(ValueError, match="without stamps"):
        ring.profile_summary(Profiled)


def test_ring_chain_rejects_bad_input(ring):
    """Shapes, dtypes and slot settings the kernel cannot take are named before anything launches."""
    w = [torch.zeros(16, 24, dtype=torch.bfloat16), torch.zeros(8, 16, dtype=torch.bfloat16)]
    acts = [torch.zeros(n, dtype=torch.bfloat16) for n in (24, 16, 8)]
    with pytest.raises(ValueError, match="need 3 activations"):
        ring.RingChain(w, acts[:2])
    with pytest.raises(ValueError, match=r"acts\[1\]: bf16"):
        ring.RingChain(w, [acts[0], acts[1].float(), acts[2]])
    with pytest.raises(ValueError, match="its input has 24 elements"):
        ring.RingChain(w[::-1], acts)
    with pytest.raises(ValueError, match="multiple of 8"):
        ring.RingChain([torch.zeros(4, 12, dtype=torch.bfloat16)], [torch.zeros(12, dtype=torch.bfloat16),
                                                                    torch.zeros(4, dtype=torch.bfloat16)])
    with pytest.raises(ValueError, match="divide slots"):
        ring.RingChain(w, acts, slots=4, consumers=3)
    with pytest.raises(ValueError, match="mode must be one of"):
        ring.RingChain(w, acts, mode="fast")
    with pytest.raises(ValueError, match="one block per SM"):
        ring.RingChain(w, acts, grid=2)  # the CPU counts as one SM
    with pytest.raises(ValueError, match="shared memory"):
        ring.RingChain([torch.zeros(8, 65536, dtype=torch.bfloat16)],
                       [torch.zeros(65536, dtype=torch.bfloat16), torch.zeros(8, dtype=torch.bfloat16)],
                       slots=1, ring_kb=200)


@pytest.mark.cuda
@pytest.mark.skipif(not import_benchmark("ring_chain").available(), reason="needs an sm_90 GPU and nvcc")
def test_ring_chain_cuda(ring):
    """Odd shapes (layers with fewer tasks than SMs and with many tasks per block), rings of 1, 2, 4 and 8
    slots (so 8 down to 1 rows per task): each layer's output from the input the kernel stored against its
    fp32 twin and float64, within ring_bound elementwise; every ring depth, a graph replay and a second
    launch store the same bits (a row's sum does not depend on the task it is in)."""
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    dims = [264, 1000, 40, 2056, 24, 4100]
    weights = [(torch.randn(n, k, generator=g) / k ** 0.5).to(torch.bfloat16).to(device)
               for k, n in zip(dims[:-1], dims[1:])]
    acts = [torch.randn(dims[0], generator=g).to(torch.bfloat16).to(device)]
    acts += [torch.empty(n, dtype=torch.bfloat16, device=device) for n in dims[1:]]
    first, rows_seen = None, set()
    for slots in (1, 2, 4, 8):
        for a in acts[1:]:
            a.fill_(float("nan"))
        chain = ring.RingChain(weights, acts, slots=slots, ring_kb=40)
        rows_seen |= set(chain.rows.values())
        chain.run()
        torch.cuda.synchronize()
        assert chain.counters.tolist() == [n // chain.rows[lay] for lay, n in enumerate(dims[1:])]
        for layer, w in enumerate(weights):
            x = acts[layer]
            assert_kernel_close(acts[layer + 1].cpu(), (w.float() @ x.float()).to(torch.bfloat16).cpu(),
                                w.double().cpu() @ x.double().cpu(), terms=w.shape[1])
        assert ring.check_layers(chain) <= 1
        if first is None:
            first = [a.clone() for a in acts[1:]]
        for a, b in zip(acts[1:], first):
            assert torch.equal(a, b), slots
    assert rows_seen == {1, 2, 4, 8}
    for grid in (1, 3, 17):  # many tasks per block, a block's first task of a layer anywhere in its list; with
        # 17, blocks without a task in the 24-row layer, whose warps go on to the next layer's tasks
        for a in acts[1:]:
            a.fill_(float("nan"))
        ring.RingChain(weights, acts, slots=2, ring_kb=40, grid=grid).run()
        torch.cuda.synchronize()
        for a, b in zip(acts[1:], first):
            assert torch.equal(a, b), grid
    profiled = ring.RingChain(weights, acts, slots=4, ring_kb=40, grid=17, profile=True)
    for a in acts[1:]:
        a.fill_(float("nan"))
    profiled.run()
    torch.cuda.synchronize()
    for a, b in zip(acts[1:], first):  # the stamps change no result
        assert torch.equal(a, b)
    issued, taken, x, data, stored = profiled.prof.cpu().unbind(1)
    assert (issued > 0).all() and (taken <= x).all() and (x <= data).all() and (data <= stored).all()
    assert (issued <= data).all()  # a slot's bytes arrive after their copy was issued
    assert len(ring.profile_summary(profiled)) == len(weights)
    for mode in ("stream", "compute"):  # the diagnostics keep the protocol: every task counted, no hang
        diag = ring.RingChain(weights, acts, slots=4, ring_kb=40, mode=mode)
        diag.run()
        torch.cuda.synchronize()
        assert diag.counters.tolist() == [n // diag.rows[lay] for lay, n in enumerate(dims[1:])]
    for a in acts[1:]:
        a.fill_(float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain.run()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(acts[1:], first):
        assert torch.equal(a, b)
    chain.run()
    torch.cuda.synchronize()
    for a, b in zip(acts[1:], first):
        assert torch.equal(a, b)
