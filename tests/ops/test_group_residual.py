"""ops.group_residual against reference.group_residual and float64 (CPU: TRITON_INTERPRET=1)."""

import pytest
import torch

from cqil_kernels.ops.group_residual import group_residual, rank_residual
from cqil_kernels.reference.group_residual import group_residual_ref, rank_residual_ref

from conftest import assert_kernel_close, poisoned

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,D", [(1, 576), (7, 59), (3, 4096)])
@pytest.mark.parametrize("P,bypass", [(1, 0), (2, 1), (3, 0), (4, 2), (4, 3), (3, 5), (9, 8), (16, 3)])
@pytest.mark.parametrize("mode", ["residual", "mlp_input"])
def test_group_residual(dtype, M, D, P, bypass, mode):
    g = torch.Generator().manual_seed(P * 7 + bypass + M)
    h = torch.randn(M, D, generator=g, dtype=torch.float64)
    a = torch.randn(P, M, D, generator=g, dtype=torch.float64)
    nw = 1 + 0.3 * torch.randn(P, D, generator=g, dtype=torch.float64)
    h, a, nw = (t.to(DEVICE, dtype) for t in (h, a, nw))
    kw = dict(eps=1e-5, bypass=bypass, bypass_mode=mode)
    out = (poisoned((P, M, D), dtype, DEVICE), poisoned((M, D), torch.float32, DEVICE))
    xn, res = group_residual(h, a, nw, out=out, **kw)
    xn_twin, res_twin = group_residual_ref(h, a, nw, **kw)
    xn64, res64 = group_residual_ref(h.double(), a.double(), nw.double(), **kw)
    assert xn is out[0] and res is out[1]
    assert_kernel_close(xn, xn_twin, xn64)
    assert_kernel_close(res, res_twin, res64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,D", [(1, 576), (7, 59)])
@pytest.mark.parametrize("received,include_h", [(False, True), (True, False), (True, True), (False, False)])
@pytest.mark.parametrize("mode", ["residual", "mlp_input"])
def test_rank_residual(dtype, M, D, received, include_h, mode):
    g = torch.Generator().manual_seed(M + D + received)
    h, a, b = (torch.randn(M, D, generator=g, dtype=torch.float64) for _ in range(3))
    nw = 1 + 0.3 * torch.randn(D, generator=g, dtype=torch.float64)
    h, a, b, nw = (t.to(DEVICE, dtype) for t in (h, a, b, nw))
    kw = dict(eps=1e-5, received=b if received else None, include_h=include_h, bypass_mode=mode)
    xn, res = rank_residual(h, a, nw, **kw)
    xn_twin, res_twin = rank_residual_ref(h, a, nw, **kw)
    kw64 = dict(kw, received=b.double() if received else None)
    xn64, res64 = rank_residual_ref(h.double(), a.double(), nw.double(), **kw64)
    assert_kernel_close(xn, xn_twin, xn64)
    assert_kernel_close(res, res_twin, res64)


def test_rank_residual_splits_group_residual():
    """Summing the ranks' residuals (rank 0 with h) gives the single-process group's residual, and each
    rank's MLP input is the group's x_j: the split of parallel/rank.py in one line of algebra."""
    h, a = torch.randn(3, 48, device=DEVICE), torch.randn(3, 3, 48, device=DEVICE)
    nw = 1 + 0.1 * torch.randn(3, 48, device=DEVICE)
    for mode in ("residual", "mlp_input"):
        xn, res = group_residual(h, a, nw, eps=1e-6, bypass=2, bypass_mode=mode)
        total = torch.zeros_like(res)
        for j in range(3):
            b = a[:j].sum(0) if j else None
            xn_j, res_j = rank_residual(h, a[j], nw[j], eps=1e-6, received=b, include_h=j == 0, bypass_mode=mode)
            torch.testing.assert_close(xn_j, xn[j])
            total += res_j
        torch.testing.assert_close(total, res)


@pytest.mark.parametrize("P,D,tiled", [(4, 4096, True), (8, 2048, True), (1, 16384, True), (8, 4096, False),
                                        (9, 64, False), (16, 1024, False)])
def test_a_group_too_large_for_one_tile_runs_layer_by_layer(monkeypatch, P, D, tiled):
    """The P layers' rows load as one [P, D] tile up to TILE_ELEMENTS and TILE_LAYERS (no spills, sm_90); a larger
    group, whose tile would spill kilobytes and compile for tens of seconds, runs layer by layer (one compile)."""
    import cqil_kernels.ops.group_residual as R

    launches = []
    kernel = R._group_residual_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs)
                return kernel[grid](*args, **kwargs)
            return launch
    monkeypatch.setattr(R, "_group_residual_kernel", Spy())
    h, a, nw = torch.randn(1, D, device=DEVICE), torch.randn(P, 1, D, device=DEVICE), torch.ones(P, D, device=DEVICE)
    xn, res = group_residual(h, a, nw, eps=1e-6, bypass=min(P - 1, 3))
    (kwargs,) = launches
    assert kwargs["TILED"] is tiled and (kwargs["BLOCK_P"] == 1 or tiled)
    xn_twin, res_twin = group_residual_ref(h, a, nw, eps=1e-6, bypass=min(P - 1, 3))
    torch.testing.assert_close(xn, xn_twin)
    torch.testing.assert_close(res, res_twin)


def test_bypass_changes_the_result():
    """A kernel that ignored the bypass or the mode would pass a P = 1 test; this one would not."""
    h, a, nw = torch.randn(2, 48, device=DEVICE), torch.randn(3, 2, 48, device=DEVICE), torch.ones(
        3, 48, device=DEVICE)
    results = [group_residual(h, a, nw, eps=1e-6, bypass=d, bypass_mode=m)
               for d, m in [(0, "residual"), (1, "residual"), (1, "mlp_input")]]
    assert not torch.allclose(results[0][0], results[1][0])
    assert not torch.allclose(results[1][1], results[2][1])
    torch.testing.assert_close(results[1][0], results[2][0])  # the MLP input is the same in both modes


def test_bad_input_is_refused():
    h, a, nw = torch.randn(2, 48, device=DEVICE), torch.randn(3, 2, 48, device=DEVICE), torch.ones(
        3, 48, device=DEVICE)
    with pytest.raises(ValueError, match="does not match"):
        group_residual(h[:1], a, nw, eps=1e-6)
    with pytest.raises(ValueError, match="norm_weight must have shape"):
        group_residual(h, a, nw[:2], eps=1e-6)
    with pytest.raises(ValueError, match="bypass must be"):
        group_residual(h, a, nw, eps=1e-6, bypass=-1)
    with pytest.raises(ValueError, match="bypass_mode"):
        group_residual(h, a, nw, eps=1e-6, bypass_mode="both")
    with pytest.raises(TypeError, match="a must be torch.float32"):
        group_residual(h, a.half(), nw, eps=1e-6)
    with pytest.raises(ValueError, match="received"):
        rank_residual(h, a[0], nw[0], eps=1e-6, received=h[:1])
    with pytest.raises(ValueError, match="norm_weight must have shape"):
        rank_residual(h, a[0], nw[0, :40], eps=1e-6)
