"""ops.group_gemm against reference.group_gemm and float64, on odd shapes (CPU: TRITON_INTERPRET=1)."""

import pytest
import torch

from cqil_kernels.ops.group_gemm import group_down_sum, group_linear, group_swiglu
from cqil_kernels.reference.group_gemm import group_down_sum_ref, group_linear_ref, group_swiglu_ref

from conftest import assert_kernel_close, poisoned

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, K, N): decode-like and prefill-like rows; hidden 576 (SmolLM2) and sizes that are no multiple of 16
SHAPES = [(1, 576, 96), (5, 59, 83), (37, 48, 130)]


def _rand(*shape, dtype, scale=1.0):
    return (scale * torch.randn(*shape, dtype=torch.float64)).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("P", [1, 2, 3, 4])
@pytest.mark.parametrize("shared,norm,bias", [(True, True, False), (True, True, True), (False, False, True),
                                              (True, False, False)], ids=["qkv", "qkv-bias", "o-bias", "shared"])
def test_group_linear(dtype, M, K, N, P, shared, norm, bias):
    torch.manual_seed(P * 1000 + M)
    x = _rand(*((M, K) if shared else (P, M, K)), dtype=dtype, scale=2.0)
    w = _rand(P, N, K, dtype=dtype, scale=K ** -0.5)
    nw = _rand(P, K, dtype=dtype) + 1 if norm else None
    b = _rand(P, N, dtype=dtype) if bias else None
    out = group_linear(x, w, norm_weight=nw, eps=1e-5, bias=b, out=poisoned((P, M, N), dtype, DEVICE))
    twin = group_linear_ref(x, w, norm_weight=nw, eps=1e-5, bias=b)
    exact = group_linear_ref(x.double(), w.double(), norm_weight=None if nw is None else nw.double(),
                             eps=1e-5, bias=None if b is None else b.double())
    assert_kernel_close(out, twin, exact, terms=K)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("P", [1, 3, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_group_swiglu(dtype, M, K, N, P, bias):
    torch.manual_seed(P * 100 + M)
    x = _rand(P, M, K, dtype=dtype)
    wg, wu = _rand(P, N, K, dtype=dtype, scale=K ** -0.5), _rand(P, N, K, dtype=dtype, scale=K ** -0.5)
    bg, bu = (_rand(P, N, dtype=dtype), _rand(P, N, dtype=dtype)) if bias else (None, None)
    out = group_swiglu(x, wg, wu, bias_gate=bg, bias_up=bu, out=poisoned((P, M, N), dtype, DEVICE))
    twin = group_swiglu_ref(x, wg, wu, bias_gate=bg, bias_up=bu)
    d = (lambda t: None if t is None else t.double())
    exact = group_swiglu_ref(x.double(), wg.double(), wu.double(), bias_gate=d(bg), bias_up=d(bu))
    assert_kernel_close(out, twin, exact, terms=K)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,F,D", [(1, 83, 576), (7, 130, 59), (33, 64, 48)])
@pytest.mark.parametrize("P", [1, 2, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_group_down_sum(dtype, M, F, D, P, bias):
    torch.manual_seed(P * 10 + M)
    x = _rand(P, M, F, dtype=dtype)
    w = _rand(P, D, F, dtype=dtype, scale=F ** -0.5)
    res = _rand(M, D, dtype=torch.float32)
    b = _rand(P, D, dtype=dtype) if bias else None
    out = group_down_sum(x, w, res, bias=b, out=poisoned((M, D), dtype, DEVICE))
    twin = group_down_sum_ref(x, w, res, bias=b)
    exact = group_down_sum_ref(x.double(), w.double(), res.double(), bias=None if b is None else b.double())
    assert_kernel_close(out, twin, exact, terms=P * F)


def test_weights_may_be_a_slice_of_a_larger_packed_tensor():
    """The model passes layer slices [l0:l0+P] of all-layer tensors; strides stay those of the whole."""
    packed = _rand(6, 40, 48, dtype=torch.float32)
    x = _rand(3, 48, dtype=torch.float32)
    out = group_linear(x, packed[2:5])
    torch.testing.assert_close(out, group_linear_ref(x, packed[2:5]))


# --------------------------------------------------------------------------------------------------
# Bad input: a clear error before launch


def test_bad_input_is_refused():
    x = _rand(3, 48, dtype=torch.float32)
    w = _rand(2, 40, 48, dtype=torch.float32)
    with pytest.raises(ValueError, match="features"):
        group_linear(_rand(3, 47, dtype=torch.float32), w)
    with pytest.raises(TypeError, match="w must be torch.float32"):
        group_linear(x, w.half())
    with pytest.raises(ValueError, match="P = 2"):
        group_linear(_rand(3, 3, 48, dtype=torch.float32), w)
    with pytest.raises(ValueError, match="contiguous"):
        group_linear(x, w.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(ValueError, match="last dimension"):
        group_linear(_rand(48, 3, dtype=torch.float32).t(), w)
    with pytest.raises(ValueError, match="norm_weight must have shape"):
        group_linear(x, w, norm_weight=_rand(2, 40, dtype=torch.float32))
    with pytest.raises(TypeError, match="not supported"):
        group_linear(x.double(), w.double())
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        group_linear(x.tolist(), w)
    with pytest.raises(ValueError, match="out must have shape"):
        group_linear(x, w, out=torch.empty(2, 3, 41, device=DEVICE))
    with pytest.raises(ValueError, match="bias_gate and bias_up"):
        group_swiglu(x, w, w, bias_gate=_rand(2, 40, dtype=torch.float32))
    with pytest.raises(ValueError, match="residual must have shape"):
        group_down_sum(_rand(2, 3, 48, dtype=torch.float32), w, _rand(3, 41, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"\[P, M, F\]"):
        group_down_sum(x, w)


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU-only: the refusal of CPU tensors outside the interpreter")
def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        group_linear(_rand(3, 48, dtype=torch.float32), _rand(2, 40, 48, dtype=torch.float32))
