"""ops.rms_norm against reference.rms_norm (the torch backend's RMSNorm) and float64 (CPU:
TRITON_INTERPRET=1)."""

import pytest
import torch

from cqil_kernels.ops.rms_norm import group_rms_norm
from cqil_kernels.reference.rms_norm import group_rms_norm_ref

from conftest import assert_kernel_close, poisoned

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,D", [(1, 576), (7, 59), (3, 4096), (0, 48)])
@pytest.mark.parametrize("P", [1, 3])
def test_group_rms_norm(dtype, M, D, P):
    g = torch.Generator().manual_seed(M * 31 + D + P)
    x = (3 * torch.randn(M, D, generator=g, dtype=torch.float64)).to(DEVICE, dtype)
    w = (1 + 0.3 * torch.randn(P, D, generator=g, dtype=torch.float64)).to(DEVICE, dtype)
    out = poisoned((P, M, D), dtype, DEVICE)
    got = group_rms_norm(x, w, eps=1e-5, out=out)
    assert got is out
    assert_kernel_close(got, group_rms_norm_ref(x, w, eps=1e-5), group_rms_norm_ref(x.double(), w.double(), eps=1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_group_rms_norm_rounds_as_the_torch_backend(dtype):
    """Normalised in fp32, rounded to the dtype, then scaled (torch's rounding points): equal to
    model.rms_norm up to the mean's summation order and the hardware's rsqrt: the scale 1/rms may
    differ by an ulp, which in float32, with the two roundings after it, moves an output by at most 3
    ulps (78% of the bits were equal on an H200), and in float16 at most by one rounding step. (Not
    bfloat16: the interpreter truncates fp32 -> bf16 where the GPU rounds.)"""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 96, generator=g).to(DEVICE, dtype)
    w = (1 + 0.3 * torch.randn(2, 96, generator=g)).to(DEVICE, dtype)
    got, twin = group_rms_norm(x, w, eps=1e-6), group_rms_norm_ref(x, w, eps=1e-6)
    ulps = 3 if dtype == torch.float32 else 1
    ulp = torch.finfo(dtype).eps * twin.abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((got - twin).abs() <= ulps * ulp).all()


def test_group_rms_norm_bad_input():
    x, w = torch.randn(3, 8, device=DEVICE), torch.ones(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        group_rms_norm(x, torch.ones(2, 9, device=DEVICE), eps=1e-6)
    with pytest.raises(TypeError, match="weight"):
        group_rms_norm(x, w.half(), eps=1e-6)
    with pytest.raises(ValueError, match="x must have 2"):
        group_rms_norm(x[None], w, eps=1e-6)
    with pytest.raises(ValueError, match="eps"):
        group_rms_norm(x, w, eps=-1.0)
    with pytest.raises(ValueError, match="out must have shape"):
        group_rms_norm(x, w, eps=1e-6, out=torch.empty(2, 3, 9, device=DEVICE))
    with pytest.raises(TypeError, match="torch.Tensor"):
        group_rms_norm([1.0], w, eps=1e-6)
