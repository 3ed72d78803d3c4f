"""ops.group_residual vs the torch backend's per-layer bypass sums, residual adds and RMSNorm."""

import pytest

from conftest import SHAPES, gpu_benchmark, randn, rms_norm


@pytest.mark.parametrize("impl", ["fused", "torch"])
@pytest.mark.parametrize("T", [1, 512])
@pytest.mark.parametrize("P,bypass", [(1, 0), (2, 1), (4, 1)])
@pytest.mark.parametrize("shape", SHAPES)
def test_group_residual(benchmark, shape, P, bypass, T, impl):
    from cqil_kernels.ops.group_residual import group_residual

    D = SHAPES[shape]["D"]

    def fused(h, a, nw):
        group_residual(h, a, nw, eps=1e-5, bypass=bypass)

    def torch_residual(h, a, nw):
        total = h
        for j in range(P):
            r = a[j] + sum(a[max(0, j - bypass):j])
            rms_norm(h + r, nw[j])
            total = total + r
        return total

    make = lambda: (randn(T, D), randn(P, T, D), 1 + randn(P, D, scale=0.1))  # noqa: E731
    nbytes = 2 * (T * D + 2 * P * T * D + P * D) + 4 * T * D
    gpu_benchmark(benchmark, make, fused if impl == "fused" else torch_residual, nbytes=nbytes)


@pytest.mark.parametrize("impl", ["fused", "torch"])
@pytest.mark.parametrize("T", [1, 512])
@pytest.mark.parametrize("received", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_rank_residual(benchmark, shape, received, T, impl):
    """One layer of a group on one rank (parallel/rank.py): bypass received from the other ranks."""
    from cqil_kernels.ops.group_residual import rank_residual

    D = SHAPES[shape]["D"]

    def fused(h, a, b, nw):
        rank_residual(h, a, nw, eps=1e-5, received=b if received else None, include_h=False)

    def torch_residual(h, a, b, nw):
        r = a + b if received else a
        rms_norm(h + r, nw)
        return r.float()

    make = lambda: (randn(T, D), randn(T, D), randn(T, D), 1 + randn(D, scale=0.1))  # noqa: E731
    nbytes = 2 * ((3 if received else 2) * T * D + T * D + D) + 4 * T * D
    gpu_benchmark(benchmark, make, fused if impl == "fused" else torch_residual, nbytes=nbytes)
