"""ops.rms_norm (the cuBLAS prefill form's input norm of all P layers, one launch) vs torch's RMSNorm
per layer (model.rms_norm: seven elementwise launches)."""

import pytest

from conftest import SHAPES, gpu_benchmark, randn, rms_norm


@pytest.mark.parametrize("impl", ["fused", "torch"])
@pytest.mark.parametrize("T", [128, 512, 2048])
@pytest.mark.parametrize("P", [1, 2, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_group_rms_norm(benchmark, shape, P, T, impl):
    from cqil_kernels.ops.rms_norm import group_rms_norm

    D = SHAPES[shape]["D"]

    def fused(x, w):
        group_rms_norm(x, w, eps=1e-5)

    def torch_norm(x, w):
        rms_norm(x, w[:, None, :])

    make = lambda: (randn(T, D), 1 + randn(P, D, scale=0.1))  # noqa: E731
    gpu_benchmark(benchmark, make, fused if impl == "fused" else torch_norm, nbytes=2 * (T * D + P * D + P * T * D))
