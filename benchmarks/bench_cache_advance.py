"""ops.cache_advance (the KV cache's bookkeeping for a step, one launch) vs the torch ops it replaced
(reference.cache_advance). Each call first rewinds position and n_tokens (one small kernel on both
sides), so a graph replayed many times keeps writing inside the cache."""

import pytest
import torch

from conftest import gpu_benchmark


@pytest.mark.parametrize("impl", ["fused", "torch"])
@pytest.mark.parametrize("T", [1, 512])
@pytest.mark.parametrize("B", [1, 16])
def test_cache_advance(benchmark, B, T, impl):
    from cqil_kernels.ops.cache_advance import cache_advance
    from cqil_kernels.reference.cache_advance import cache_advance_ref

    advance = cache_advance if impl == "fused" else cache_advance_ref
    S = 4096

    def make():  # key_valid, n_tokens, (position, start)
        return (torch.zeros(B, S, dtype=torch.bool, device="cuda"),
                torch.zeros(B, dtype=torch.int64, device="cuda"), torch.zeros(2, dtype=torch.int32, device="cuda"))

    def op(key_valid, n_tokens, pos_start):
        pos_start.zero_()
        n_tokens.zero_()
        return advance(None, key_valid, n_tokens, pos_start[:1], pos_start[1:], T)

    gpu_benchmark(benchmark, make, op, nbytes=B * T * (1 + 8) + 2 * 8 * B)  # flags and positions written
