"""ops.argmax (greedy decoding's argmax) vs torch.argmax, on the vocabularies of our shapes."""

import pytest

from conftest import SHAPES, gpu_benchmark, randn


@pytest.mark.parametrize("impl", ["fused", "torch"])
@pytest.mark.parametrize("B", [1, 16])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_argmax(benchmark, shape, B, impl):
    from cqil_kernels.ops.argmax import row_argmax

    op = row_argmax if impl == "fused" else (lambda x: x.argmax(-1))
    V = SHAPES[shape]["V"]
    gpu_benchmark(benchmark, lambda: (randn(B, V),), op, nbytes=2 * B * V)
